#!/usr/bin/env bash
# Set up everything sweeper needs on a fresh Debian machine (Python 3.11): system packages
# (offline Fashion-MNIST; for the multi-machine tests PostgreSQL and a one-node Slurm
# cluster: slurmctld/slurmd, munge, and slurmdbd on MariaDB for sacct), a virtualenv in
# .venv, and the project with its test tools. Safe to run again. The tests start their own
# servers (own folders, sockets and ports) and need none of these running as services.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(dataset-fashion-mnist postgresql slurm-wlm slurmdbd munge mariadb-server)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" || true
.venv/bin/python -c "import torch, torchvision, hydra, optuna, mlflow" \
  || { echo "setup.sh: the install did not finish; see the messages above" >&2; exit 1; }
