#!/bin/bash
# termtune's bootstrap inside a SageMaker training job: the job's ContainerArguments run this file from the
# code channel. It installs termtune's wheel into a folder of the job (never into the image's Python), checks
# the pinned requirements, then hands over to `python -m termtune.remote.entry` (docs/sagemaker.md).
# TERMTUNE_OPT_ML moves the job's root away from /opt/ml (an offline rehearsal).
set -uo pipefail

OPT_ML="${TERMTUNE_OPT_ML:-/opt/ml}"
CODE="$OPT_ML/input/data/code"
SITE="$OPT_ML/termtune/site"
PIP_LOG="$OPT_ML/termtune/pip.log"

fail() {  # the reason becomes the job's FailureReason
    mkdir -p "$OPT_ML/output"
    printf '%s\n' "$1" > "$OPT_ML/output/failure"
    echo "termtune: error: $1" >&2
    exit 1
}

last_lines() { tail -n 3 "$PIP_LOG" | tr '\n' ' '; }

mkdir -p "$OPT_ML/termtune" || fail "cannot create $OPT_ML/termtune: the job's root is not writable"
WHEELS=("$CODE"/termtune-*-py3-none-any.whl)
[ -f "${WHEELS[0]}" ] || fail "no termtune wheel in $CODE: the code channel is missing or incomplete (rebuild the bundle)"
[ "${#WHEELS[@]}" -eq 1 ] || fail "${#WHEELS[@]} termtune wheels in $CODE: the code channel must hold exactly one"

echo "termtune: installing ${WHEELS[0]##*/} into $SITE"
rm -rf "$SITE"
python -m pip install --no-deps --no-index --no-warn-script-location --target "$SITE" "${WHEELS[0]}" \
    > "$PIP_LOG" 2>&1 || fail "pip could not install ${WHEELS[0]##*/}: $(last_lines)"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

echo "termtune: checking $CODE/requirements.txt"
python -m pip install --no-warn-script-location -r "$CODE/requirements.txt" >> "$PIP_LOG" 2>&1 \
    || fail "pip could not install termtune's requirements (without internet access a job can only use what the image holds): $(last_lines)"

export PYTHONUNBUFFERED=1
exec python -m termtune.remote.entry
