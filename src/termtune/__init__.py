"""termtune: teach Flan-T5 a field's terminology and ship it to Amazon Bedrock Custom Model Import."""

__version__ = "0.1.0"
