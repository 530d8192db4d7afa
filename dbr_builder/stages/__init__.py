"""The pipeline stages, one module (or subpackage) each; ``trainers`` is the train stage.

A stage module exposes:

- ``add_arguments(parser)``: its CLI options;
- ``main(args) -> int``: the CLI verb;
- ``run(cfg, workdir) -> dict``: the pipeline stage (cfg is the stage's YAML entry,
  with ``dataset`` set for per-dataset stages and ``root`` defaulted);
- ``outputs(cfg, workdir) -> list[Path]``: what ``run`` writes (for up-to-date checks);
- optionally ``inputs(cfg, workdir) -> list[Path]``: files outside the work dir it reads;
- ``PER_DATASET: bool``: whether ``dbr run`` calls it once per dataset.

``dbr_builder.pipeline.STAGES`` maps each verb to its module.
"""
