"""Amazon Bedrock Custom Model Import with boto3: S3 upload, IAM role, import job, invoke, cleanup.

Modules: clients (the one boto3 client factory), names (the service's patterns), s3, iam,
bedrock (control plane), stage (deploy / role / cleanup), runtime (invoke).
"""

from termtune.aws.runtime import invoke, invoke_cli
from termtune.aws.stage import DeployResult, cleanup, deploy, ensure_role, imported_model_gone

__all__ = ["DeployResult", "cleanup", "deploy", "ensure_role", "imported_model_gone", "invoke", "invoke_cli"]
