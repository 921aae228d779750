#!/usr/bin/env bash
# Install the notebook toolchain and execute every notebook headless.
#
#   scripts/notebooks.sh                 install what is missing, run notebooks/*.ipynb
#   scripts/notebooks.sh NB.ipynb ...    install what is missing, run the named notebooks
#   scripts/notebooks.sh --install-only  install the kernel and the executor, run nothing
#
# (a) the Jupyter kernel: evcxr_jupyter (pinned), `cargo install --locked`, unless that
#     version is installed already; then `evcxr_jupyter --install` registers the `rust` kernel;
# (b) the headless executor: jupyter_client, nbclient, nbformat, ipykernel (pinned), with pip,
#     unless those versions are installed already;
# (c) scripts/run_notebooks.py: runs each notebook top to bottom, fails on any cell error,
#     checks committed notebooks carry no outputs and that plots were produced, prints
#     per-notebook wall times.
#
# evcxr builds the notebook's `:dep` crates in its own cargo project; the runner points it at
# a persistent folder (~/.cache/quantlab/evcxr/<checkout>, see docs/notebooks.md) so later
# runs reuse the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVCXR_VERSION=0.22.0
PY_PINS=(jupyter_client==8.10.0 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0)
PYTHON=${PYTHON:-python3}

install_only=0
if [[ "${1:-}" == "--install-only" ]]; then
    install_only=1
    shift
fi

# (a) evcxr_jupyter
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if cargo install --list | grep -qx "evcxr_jupyter v${EVCXR_VERSION}:"; then
    echo "notebooks.sh: evcxr_jupyter ${EVCXR_VERSION} already installed"
else
    echo "notebooks.sh: installing evcxr_jupyter ${EVCXR_VERSION} (about 6 minutes on 2 cores)"
    # A CARGO_TARGET_DIR set for the workspace must not receive evcxr's build. The kernel
    # only drives cargo and rustc (the cells' numeric work runs in the compiled crates), so
    # it is built at opt-level 1 without LTO: 5.6 minutes instead of about 8.5 on 2 cores
    # (docs/notebooks.md).
    env -u CARGO_TARGET_DIR \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_INCREMENTAL=false \
        cargo install evcxr_jupyter --version "${EVCXR_VERSION}" --locked
fi
evcxr_jupyter --install >/dev/null
echo "notebooks.sh: Jupyter kernel 'rust' registered"

# (b) the headless executor
if "$PYTHON" - "${PY_PINS[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
def have(pin):
    name, want = pin.split("==")
    try:
        return version(name) == want
    except PackageNotFoundError:
        return False
sys.exit(0 if all(have(p) for p in sys.argv[1:]) else 1)
PY
then
    echo "notebooks.sh: ${PY_PINS[*]} already installed"
else
    echo "notebooks.sh: pip install ${PY_PINS[*]}"
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check "${PY_PINS[@]}"
fi

if [[ $install_only == 1 ]]; then
    exit 0
fi

# (c) run
exec "$PYTHON" scripts/run_notebooks.py "$@"
