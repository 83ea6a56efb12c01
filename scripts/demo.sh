#!/usr/bin/env bash
# The offline demo: the whole pipeline, data -> train -> evaluate -> export -> validate ->
# deploy -> invoke, against local stand-ins for AWS on 127.0.0.1:
#   moto's server        plays S3, IAM, STS and KMS, with IAM access control on
#                        (python -m termtune.rehearsal), so the import role's policy is enforced
#   termtune serve       plays Amazon Bedrock (import jobs + InvokeModel, with real generation)
# termtune reaches them only through the SDK's standard endpoint variables; unset them (and
# use real credentials) and the same commands talk to real AWS. See docs/aws.md.
# Run from the repository root with the venv on PATH (`make demo` does both).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/demo.yaml}
LOGS=$(mktemp -d -t termtune-demo-XXXXXX)
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MOTO_PORT=$(free_port)
BEDROCK_PORT=$(free_port)

# Local endpoints only: nothing here can reach AWS. The credentials are issued by moto below.
export AWS_DEFAULT_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$MOTO_PORT
export AWS_ENDPOINT_URL_IAM=http://127.0.0.1:$MOTO_PORT
export AWS_ENDPOINT_URL_STS=http://127.0.0.1:$MOTO_PORT
export AWS_ENDPOINT_URL_KMS=http://127.0.0.1:$MOTO_PORT
export AWS_ENDPOINT_URL_BEDROCK=http://127.0.0.1:$BEDROCK_PORT
export AWS_ENDPOINT_URL_BEDROCK_RUNTIME=http://127.0.0.1:$BEDROCK_PORT

# Start the two services in the background; stop exactly these two on any exit.
# moto first: it issues the administrator's access key that everything else (serve too) signs with.
python -m termtune.rehearsal --port "$MOTO_PORT" --env-file "$LOGS/moto.env" >"$LOGS/moto.log" 2>&1 &
MOTO_PID=$!
SERVE_PID=
trap 'kill $MOTO_PID $SERVE_PID 2>/dev/null || true; wait $MOTO_PID $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do [ -s "$LOGS/moto.env" ] && break; sleep 0.1; done
[ -s "$LOGS/moto.env" ] || { echo "demo: moto did not start (see $LOGS/moto.log)" >&2; exit 1; }
# shellcheck disable=SC1091
source "$LOGS/moto.env"

termtune serve --host 127.0.0.1 --port "$BEDROCK_PORT" --cold-start 10 >"$LOGS/serve.log" 2>&1 &
SERVE_PID=$!

python - "$BEDROCK_PORT" <<'PY'
import socket, sys, time
for port in map(int, sys.argv[1:]):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"demo: nothing is listening on 127.0.0.1:{port}")
PY
echo "demo: S3/IAM/STS/KMS (moto, IAM enforced) on :$MOTO_PORT, Bedrock (termtune serve) on :$BEDROCK_PORT; logs in $LOGS"

python -c 'import boto3; boto3.client("s3").create_bucket(Bucket="termtune-demo")'

# Both services start empty, so a deployment recorded by an earlier demo is gone: forget it.
RUN_DIR=$(python -c 'import sys; from termtune.config import load_config; print(load_config(sys.argv[1]).run_dir)' "$CONFIG")
if [ -f "$RUN_DIR/deploy.json" ]; then
  termtune cleanup "$CONFIG" --yes
fi

termtune run "$CONFIG"
