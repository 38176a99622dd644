# Sourced by .ci/lock and .ci/latest: a fresh virtual environment in $1 with the newest releases that
# pyproject.toml's ranges admit for the test extra (no constraints.txt), activated in the calling shell.
# torch stays at the CPU build (torch==2.13.0): a newer torch from PyPI is a multi-GB CUDA build.
newest_env() {
    python3 -m venv "$1"
    # shellcheck disable=SC1091
    . "$1/bin/activate"
    python -m pip install --quiet --upgrade pip
    pip install --quiet torch==2.13.0
    # Eager upgrades would replace torch too (with PyPI's CUDA build); every other package goes to its newest.
    echo "torch==2.13.0" > "$1/torch-cpu.txt"
    pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" -c "$1/torch-cpu.txt"
}

# The installed packages as constraints lines (NAME==VERSION), torch's local build label dropped.
frozen() {
    pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
}
