#!/usr/bin/env bash
# The offline demo: the whole pipeline, data -> train -> evaluate -> export -> validate ->
# deploy -> invoke, against local stand-ins for AWS on 127.0.0.1 (termtune.local):
#   moto's server        plays S3, IAM, STS and KMS, with IAM access control on
#                        (termtune.rehearsal), so the import role's policy is enforced
#   termtune serve       plays Amazon Bedrock (import jobs + InvokeModel, with real generation)
# termtune reaches them only through the SDK's standard endpoint variables; unset them (and
# use real credentials) and the same commands talk to real AWS. See docs/aws.md.
# Run from the repository root with the venv on PATH (`make demo` does both). CONFIG picks the demo:
# configs/demo.yaml (the default, `make demo`) fine-tunes SmolLM2-135M-Instruct from its GGUF file;
# configs/demo-t5.yaml (`make demo-t5`) trains a small random-init Flan-T5-shaped model.
set -euo pipefail
cd "$(dirname "$0")/.."

# Start the stand-ins (termtune.local: free ports, the SDK's endpoint variables, moto's access key,
# the demo bucket) and run this script again inside them; they stop, exactly these two, when it ends.
if [ -z "${TERMTUNE_DEMO_INSIDE:-}" ]; then
  exec python -m termtune.local --bucket termtune-demo --cold-start 10 -- env TERMTUNE_DEMO_INSIDE=1 bash scripts/demo.sh "$@"
fi

CONFIG=${CONFIG:-configs/demo.yaml}

# Both services start empty, so a deployment recorded by an earlier demo is gone: forget it.
RUN_DIR=$(python -c 'import sys; from termtune.config import load_config; print(load_config(sys.argv[1]).run_dir)' "$CONFIG")
if [ -f "$RUN_DIR/deploy.json" ]; then
  termtune cleanup "$CONFIG" --yes
fi

termtune run "$CONFIG"
