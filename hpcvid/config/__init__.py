"""Job specs: YAML -> frozen dataclasses, strictly.

Every mistake in a spec (unknown key, wrong type, missing value, bad choice, out-of-range number) becomes one
`SpecError` whose text is `FILE: key.path: what is wrong`, which the CLI prints as one line with exit status 2.
`--set a.b.c=value` overrides are applied to the raw YAML before validation, so they get the same checks.

A job file holds one section per stage it configures, e.g. `prep:`; `hpcvid check JOB.yaml` validates them all.

Two steps, kept apart on purpose:
  load_job / parse_spec   the file and the values: UTF-8, YAML without duplicate keys, types, finite numbers within
                          each field's bounds (`_num` field metadata), cross-field rules (`validate` methods).
                          Pure: also used to re-read frozen specs inside submitted jobs and status tables.
  preflight               the filesystem: inputs exist, outputs can be created. Run by `hpcvid check` and by every
                          stage at start (CLI and StageJob), where the paths must hold - not at submit time, when
                          an earlier stage may not have written them yet.
"""
from __future__ import annotations

from hpcvid.config.loader import (EXIT_PREEMPTED, EXIT_RUN_STOPPED, EXIT_USER_ERROR, Preempted, RunStopped, SpecError, StrictLoader, UserError,
                                  _positive_or_none, _ValueProblem, apply_override, digest, error_line, name_source,
                                  parse_spec, read_yaml, to_dict)
from hpcvid.config.preflight import STAGE_SECTIONS, preflight
from hpcvid.config.specs import (AEDataSpec, AELossSpec, AEModelSpec, ClipSpec, DiTModelSpec, EncoderSpec, EvalAESpec,
                                 FlowSpec, JobSpec, ManifestSpec, PrepSpec, RenderSpec, SampleSpec, ScopeSpec,
                                 SelftestSpec, ShardSpec, TextSpec, TrainAESpec, TrainDataSpec, TrainSpec, load_job)

__all__ = ["EXIT_PREEMPTED", "Preempted", "AEDataSpec", "AELossSpec", "AEModelSpec", "ClipSpec", "DiTModelSpec", "FlowSpec", "TrainDataSpec",
           "TrainSpec", "SampleSpec", "RenderSpec", "ScopeSpec", "EXIT_RUN_STOPPED", "EXIT_USER_ERROR", "EncoderSpec",
           "EvalAESpec", "JobSpec", "ManifestSpec", "PrepSpec", "RunStopped", "STAGE_SECTIONS", "SelftestSpec",
           "ShardSpec", "SpecError", "StrictLoader", "TextSpec", "TrainAESpec", "UserError", "_ValueProblem",
           "_positive_or_none", "apply_override", "digest", "error_line", "load_job", "name_source", "parse_spec",
           "preflight",
           "read_yaml", "to_dict"]
