"""Training on rented machines (SageMaker Training Jobs): what goes up and what runs there.

    channels = termtune.remote.bundle.build(cfg, dest)    # {"code": ..., "config": ..., "data": ..., "model": ...}
    bash /opt/ml/input/data/code/entry.sh                 # inside the job: termtune.remote.entry

bundle.py writes the job's input channels from a run whose data stage has run; entry.sh and entry.py are the
bootstrap the job runs (docs/sagemaker.md, "Inside the job"). Nothing here talks to AWS.
"""
