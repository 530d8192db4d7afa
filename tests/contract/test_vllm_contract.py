"""Contract test against the real vLLM 0.33 package (``make test-vllm``; skipped where vllm is absent).

What a CPU can check with vLLM's own code:

- architecture resolution (``ModelConfig`` + vLLM's model registry) of every supported student /
  teacher family, from a config-only tiny model folder and from the Hub names the backend knows;
- for an adapter made exactly as ``dbr train`` makes it (all-linear LoRA, vision included), what
  vLLM does with every module: its LoRA loader (``LoRAModel.from_local_checkpoint`` with the
  expected-module set that vLLM's worker derives from the model) accepts or rejects it, and each
  accepted module either lands on a LoRA-able layer or would be ignored (plain ``nn.Linear``, or
  tower/connector without ``enable_tower_connector_lora``); the backend's plan (direct / merge /
  refuse) must match;
- every sampling configuration of ``pipelines/*.yaml`` (and the defaults) passes ``SamplingParams``,
  and ``check_sampling`` refuses exactly what ``SamplingParams`` refuses on a grid;
- the engine arguments, ``LLM.chat`` parameters, ``image_pil`` parts and start-up error texts the
  backend relies on exist in this vLLM.

No GPU: the CUDA wheel's ``vllm._C`` kernels do not import here, and the platform is undetected, so
the test selects vLLM's CPU platform (``VLLM_TARGET_DEVICE=cpu``) and builds model classes on the
meta device (no weights). Results are written to ``$DBR_CONTRACT_OUT`` (default
``work/vllm_contract.json``) for docs/generate.md.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:  # the default `make test` environment: nothing to check here
    pytest.skip("vllm is not installed (run `make test-vllm`)", allow_module_level=True)

# Before vLLM is imported: its CPU platform (no GPU, no CUDA runtime here), and no Hub look-ups.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import vllm  # noqa: E402

from dbr_builder.backends import check_sampling  # noqa: E402
from dbr_builder.backends.vllm_backend import (  # noqa: E402
    _NAME_HINTS,
    FAMILIES,
    _adapter_rank,
    adapter_parts,
    describe_start_error,
    model_architecture,
    plan_adapter,
)
from dbr_builder.config import ConfigError, load_pipeline  # noqa: E402
from tests.contract.families import BUILDERS, build, train_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS: dict[str, Any] = {"vllm": vllm.__version__, "families": {}, "sampling": [], "hub_names": {}}
VLLM_DIR = Path(vllm.__file__).parent


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = Path(os.environ.get("DBR_CONTRACT_OUT") or ROOT / "work" / "vllm_contract.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def dist():
    """vLLM's distributed state (world size 1, gloo), needed to build its parallel layers."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:29517",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
    yield


class NoLoRA(Exception):
    """vLLM's own config validation refuses ``enable_lora`` for this architecture."""


def _vllm_model(folder: Path):
    """vLLM's ModelConfig, model class and model instance (meta device) for a config-only folder."""
    import torch
    from vllm.config import (
        DeviceConfig,
        LoadConfig,
        LoRAConfig,
        ModelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.model_executor.model_loader.utils import get_model_architecture

    mc = ModelConfig(model=str(folder), tokenizer=str(folder), skip_tokenizer_init=True, dtype="float32",
                     max_model_len=512)
    try:
        vc = VllmConfig(model_config=mc, lora_config=LoRAConfig(max_lora_rank=8, enable_tower_connector_lora=True),
                        device_config=DeviceConfig(device="cpu"), load_config=LoadConfig(load_format="dummy"))
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        if "LoRA is not supported" in str(e):
            raise NoLoRA(" ".join(str(e).split())[:300]) from None
        raise
    cls, arch = get_model_architecture(mc)
    with set_current_vllm_config(vc), torch.device("meta"):
        model = cls(vllm_config=vc, prefix="")
    return mc, cls, model


def vllm_verdict(model: Any, cls: type, adapter: Path) -> dict[str, Any]:
    """What vLLM does with each adapter module: loader accept/reject, served, or ignored (and why)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import (
        get_supported_lora_modules,
        parse_fine_tuned_lora_name,
        process_packed_modules_mapping,
    )
    from vllm.model_executor.layers.linear import LinearBase

    supported = get_supported_lora_modules(model)
    packed = process_packed_modules_mapping(model)  # as vllm/lora/model_manager.py derives it
    expected: set[str] = set()
    for m in supported:  # as vllm/lora/worker_manager.py _load_adapter derives it
        expected.update(packed.get(m, [m]))
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    try:
        LoRAModel.from_local_checkpoint(str(adapter), expected, PEFTHelper.from_local_dir(str(adapter), None),
                                        device="cpu", weights_mapper=mapper,
                                        skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        loader = "accepted"
    except ValueError as e:
        loader = "rejected: " + " ".join(str(e).split())[:300]
    mods = dict(model.named_modules())
    mm = model.get_mm_mapping() if hasattr(model, "get_mm_mapping") else None
    tower_prefixes = [p.rstrip(".") for p in ((mm.tower_model or []) + (mm.connector or []))] if mm else []
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".lora_A." in k]
    served, ignored = [], []
    tc = bool(getattr(cls, "supports_tower_connector_lora", False))
    for k in keys:
        name, _ = parse_fine_tuned_lora_name(k, mapper)
        leaf = name.rsplit(".", 1)[-1]
        target = name
        if target not in mods:  # a packed layer (q_proj -> qkv_proj, gate_proj -> gate_up_proj)
            parent = name.rsplit(".", 1)[0]
            target = next((f"{parent}.{p}" for p, subs in packed.items() if leaf in subs and f"{parent}.{p}" in mods),
                          name)
        module = mods.get(target)
        in_tower = any(target == p or target.startswith(p + ".") for p in tower_prefixes)
        if module is None:
            ignored.append((name, "no such module in vLLM's model"))
        elif not isinstance(module, LinearBase):
            ignored.append((name, f"{type(module).__name__} is not LoRA-able"))
        elif in_tower and not tc:
            ignored.append((name, "tower/connector LoRA not supported by this class"))
        else:
            served.append((name, "tower/connector" if in_tower else "language"))
    return {"class": f"{cls.__module__}.{cls.__name__}", "loader": loader, "served": served, "ignored": ignored,
            "tower_connector_lora": tc, "needs_tower_connector_flag": any(p == "tower/connector" for _, p in served),
            "expected_modules": sorted(expected)}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_family_architecture_and_adapter(arch: str, dist, tmp_path: Path):
    folder = tmp_path / "model"
    hf_model = build(arch, folder)
    adapter = train_adapter(hf_model, tmp_path / "adapter")
    try:
        mc, cls, model = _vllm_model(folder)
    except NoLoRA as e:
        # vLLM will not even start with enable_lora for this class: the backend must merge (or refuse)
        RESULTS["families"][arch] = {"loader": f"engine refuses enable_lora: {e}",
                                     "plan": plan_adapter(arch, adapter_parts(adapter), "auto").action}
        assert not FAMILIES[arch].lora
        assert plan_adapter(arch, adapter_parts(adapter), "auto").action == "merge"
        assert plan_adapter(arch, adapter_parts(adapter), "direct").action == "refuse"
        return
    except AttributeError as e:
        if "_C" not in str(e):
            raise
        # The class needs a CUDA kernel of vllm._C to be built (e.g. QuickGELU -> torch.ops._C.gelu_quick),
        # which this CPU cannot load: check what the class itself declares, and record the gap.
        from vllm.model_executor.models.registry import ModelRegistry

        cls = ModelRegistry._try_load_model_cls(arch)
        fam = FAMILIES[arch]
        RESULTS["families"][arch] = {"class": f"{cls.__module__}.{cls.__name__}", "built_on_cpu": False,
                                     "why_not": " ".join(str(e).split())[:200],
                                     "supports_lora": bool(getattr(cls, "supports_lora", False)),
                                     "tower_connector_lora": bool(getattr(cls, "supports_tower_connector_lora", False)),
                                     "plan": plan_adapter(arch, adapter_parts(adapter), "auto").action}
        assert fam.lora == bool(getattr(cls, "supports_lora", False))
        if not fam.lora:
            assert plan_adapter(arch, adapter_parts(adapter), "auto").action == "merge"
            assert plan_adapter(arch, adapter_parts(adapter), "direct").action == "refuse"
        pytest.skip(f"vLLM's {cls.__name__} cannot be built on CPU ({str(e)[:120]}); class-level facts checked")
    assert mc.architectures[0] == arch  # vLLM resolves the family's architecture
    assert model_architecture(str(folder)) == arch  # and so does the backend, from the same folder
    v = vllm_verdict(model, cls, adapter)
    auto = plan_adapter(arch, adapter_parts(adapter), "auto")
    direct = plan_adapter(arch, adapter_parts(adapter), "direct")
    RESULTS["families"][arch] = {**v, "served": len(v["served"]), "ignored_count": len(v["ignored"]),
                                 "ignored": v["ignored"][:12], "plan": auto.action, "plan_reason": auto.reason}
    clean = v["loader"] == "accepted" and not v["ignored"]
    if clean:
        # vLLM takes every module: the backend serves it directly, with the tower flag iff needed
        assert auto.action == "direct", auto.reason
        assert auto.tower_connector == v["needs_tower_connector_flag"]
    else:
        # vLLM would reject the adapter or ignore some of its modules: never served as is
        assert auto.action == "merge" and direct.action == "refuse", (auto, v["loader"], v["ignored"][:5])
    # The backend's family table is what vLLM says (so no adapter is planned on a wrong belief).
    fam = FAMILIES[arch]
    assert fam.lora == bool(getattr(cls, "supports_lora", False))
    # A LoRA rank the backend sets passes vLLM's own check of the adapter.
    from vllm.config import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    PEFTHelper.from_local_dir(str(adapter), None).validate_legal(LoRAConfig(max_lora_rank=_adapter_rank(adapter)))


def test_language_only_adapters_are_served_directly_where_vllm_takes_them(dist, tmp_path: Path):
    """`lora.vision: false`: an LM-only adapter; InternVL's is then served directly (no merge)."""
    arch = "InternVLForConditionalGeneration"
    hf_model = build(arch, tmp_path / "model")
    adapter = train_adapter(hf_model, tmp_path / "adapter", vision=False)
    mc, cls, model = _vllm_model(tmp_path / "model")
    v = vllm_verdict(model, cls, adapter)
    plan = plan_adapter(arch, adapter_parts(adapter), "auto")
    RESULTS["internvl_language_only"] = {"loader": v["loader"], "ignored": len(v["ignored"]), "plan": plan.action}
    assert v["loader"] == "accepted" and not v["ignored"]
    assert plan.action == "direct" and not plan.tower_connector


def test_hub_names_resolve_to_vllm_architectures():
    from vllm.model_executor.models.registry import ModelRegistry

    names = ["Qwen/Qwen2.5-VL-72B-Instruct-AWQ", "Qwen/Qwen2.5-VL-7B-Instruct", "OpenGVLab/InternVL3-8B-hf",
             "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct", "google/gemma-3-4b-it",
             "HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceM4/Idefics3-8B-Llama3",
             "llava-hf/llava-onevision-qwen2-7b-ov-hf"]
    archs = set(ModelRegistry.get_supported_archs())
    assert len(names) >= len(_NAME_HINTS)
    for name in names:
        arch = model_architecture(name)
        RESULTS["hub_names"][name] = arch
        assert arch in archs and arch in FAMILIES, name
        assert ModelRegistry._try_load_model_cls(arch) is not None


def _pipeline_samplings() -> list[tuple[str, int, float, float, int]]:
    """(where, n, temperature, top_p, max_tokens) of every sampling setting in pipelines/*.yaml."""
    from dbr_builder.stages import generate
    from trainers.sarr import SarrConfig

    gd, sd = generate.DEFAULTS, SarrConfig()
    out = [("generate defaults", gd["n"], gd["temperature"], gd["top_p"], gd["max_new_tokens"]),
           ("sarr defaults", sd.n, sd.temperature, sd.top_p, sd.max_new_tokens)]
    for f in sorted((ROOT / "pipelines").glob("*.yaml")):
        try:
            pipe = load_pipeline(f)
        except ConfigError:
            continue  # not a pipeline (datasets, synonyms, paper table)
        for i, st in enumerate(pipe["stages"]):
            where = f"{f.name} stages[{i}] {st['stage']}"
            if st["stage"] == "generate":
                c = {**gd, **st}
                out.append((where, c["n"], c["temperature"], c["top_p"], c["max_new_tokens"]))
            if st["stage"] == "filter" and (st.get("rationalize") or {}).get("enabled"):
                c = {**gd, "n": 2, **st["rationalize"]}
                out.append((where + " rationalize", c["n"], c["temperature"], c["top_p"], c["max_new_tokens"]))
            if st["stage"] == "train":
                s = {**vars(sd), **(st.get("sarr") or {})}
                out.append((where + " sarr", s["n"], s["temperature"], s["top_p"], s["max_new_tokens"]))
            if st["stage"] == "eval":
                budget = st.get("max_new_tokens") or 1024
                for mode, mt in (budget.items() if isinstance(budget, dict) else [("all", budget)]):
                    out.append((f"{where} {mode}", 1, float(st.get("temperature", 0.0)), float(st.get("top_p", 1.0)),
                                int(mt)))
    return out


def test_pipeline_sampling_settings_pass_vllm():
    from vllm import SamplingParams

    cases = _pipeline_samplings()
    assert len(cases) >= 6
    for where, n, temp, top_p, max_tokens in cases:
        SamplingParams(n=int(n), temperature=float(temp), top_p=float(top_p), max_tokens=int(max_tokens), seed=0)
        RESULTS["sampling"].append({"where": where, "n": n, "temperature": temp, "top_p": top_p,
                                    "max_tokens": max_tokens, "SamplingParams": "ok"})


def test_check_sampling_refuses_exactly_what_vllm_refuses():
    from vllm import SamplingParams

    agree = 0
    for n in (1, 2, 4):
        for temp in (0.0, 1e-6, 0.7):
            for top_p in (0.5, 1.0):
                try:
                    SamplingParams(n=n, temperature=temp, top_p=top_p, max_tokens=8)
                    ok_vllm = True
                except Exception:  # noqa: BLE001 - VLLMValidationError (its own class in 0.33)
                    ok_vllm = False
                try:
                    check_sampling(n, temp, top_p)
                    ok_ours = True
                except ConfigError:
                    ok_ours = False
                assert ok_ours == ok_vllm, (n, temp, top_p)
                agree += 1
    RESULTS["check_sampling_grid"] = agree


def test_engine_api_the_backend_uses():
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    chat = inspect.signature(LLM.chat).parameters
    assert {"messages", "sampling_params", "use_tqdm", "lora_request"} <= set(chat)
    fields = set(inspect.signature(EngineArgs).parameters)
    used = {"model", "tensor_parallel_size", "gpu_memory_utilization", "dtype", "enable_prefix_caching",
            "limit_mm_per_prompt", "seed", "trust_remote_code", "max_model_len", "max_num_seqs", "load_format",
            "mm_processor_kwargs", "enable_lora", "max_lora_rank", "enable_tower_connector_lora"}
    assert used <= fields, used - fields
    assert LoRARequest("adapter", 1, "/x").lora_path == "/x"
    StructuredOutputsParams(regex="a+")
    from vllm.renderers.chat_utils import types as chat_types

    assert '"image_pil"' in Path(chat_types.__file__).read_text()  # the content part type chat_messages sends
    from vllm.v1.engine.core_client import EngineCoreClient

    assert callable(getattr(EngineCoreClient, "shutdown", None))  # close(): llm.llm_engine.engine_core.shutdown()
    RESULTS["engine_args_checked"] = sorted(used)


def test_start_errors_of_this_vllm_are_classified():
    """The start-up messages vLLM 0.33 raises (read from its source) map to the backend's causes."""
    core = (VLLM_DIR / "v1" / "engine" / "utils.py").read_text()
    mem = (VLLM_DIR / "v1" / "worker" / "utils.py").read_text()
    assert '"Engine core initialization failed. "' in core
    assert "is less than desired GPU memory utilization" in mem
    msg = describe_start_error("m", RuntimeError("Engine core initialization failed. See root cause above. "
                                                 "Failed core proc(s): {}"))
    assert "engine process failed to start" in msg
    oom = re.search(r'f"Free memory on device .*?processes\."', mem, re.S)
    assert oom is not None
    assert "out of GPU memory" in describe_start_error("m", ValueError(
        "Free memory on device cuda:0 (1.0/80.0 GiB) on startup is less than desired GPU memory utilization "
        "(0.9, 72.0 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."))
    RESULTS["start_errors"] = "classified"
