"""MTCT + SARR fine-tuning of student MLLMs (transformers + peft + accelerate), leave-one-domain-out.

Modules: ``data`` (rows -> masked samples), ``loss`` (the MTCT objective), ``loop`` (one stage's
training loop with atomic checkpoints), ``sarr`` (self-labeling rounds), ``select`` (training-domain
validation by class scoring), ``train`` (the ``dbr train`` stage).
"""
