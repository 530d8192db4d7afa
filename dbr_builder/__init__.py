"""dbr-builder: build DomainBed-Reasoning and fine-tune MLLM students with MTCT + SARR."""

__version__ = "0.1.0"
