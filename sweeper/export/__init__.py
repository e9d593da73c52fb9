"""The recommended model as one file: ``python -m sweeper.export``.

A study ends with a recommendation; this makes the recommended trial's model (or any trial's)
a self-contained file that needs torch alone, and registers it in MLflow:

- the model: its input preprocessing, every freeze unit and the head in one module in eval mode,
  BatchNorm folded into the convolutions where that keeps the outputs equal (``_module``),
  saved with ``torch.export`` as ``model.pt2`` and, with onnx and onnxscript installed, as
  ``model.onnx``; ``model.json`` says what goes in and comes out;
- its weights: the trial's kept trained part, else trained again from the logged config
  (``_source``);
- MLflow: logged on the trial's run with the PyTorch flavour and registered as a version of a
  registered model (``_registry``).

Example::

    from sweeper.config import compose
    from sweeper.export import export

    done = export(compose("export"))              # the latest study's recommended model
    program = torch.export.load(done.pt2)         # anywhere, with torch alone
    logits = program.module()(uint8_images)       # (N, C, H, W) of any size
"""

from sweeper.export._export import (
    Exported,
    export,
    export_config,
    export_run,
    predict_batches,
)
from sweeper.export._module import Served, fold_batchnorm

__all__ = ["Exported", "Served", "export", "export_config", "export_run", "fold_batchnorm",
           "predict_batches"]
