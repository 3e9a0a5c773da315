"""Loading a model the way diffusers users do (--variant, --revision, --local-files-only,
single-file checkpoints, --lora, --device auto), and the errors a user meets on the way: a
mistyped built-in name, an unreachable hub, MPS, an out-of-range --layer, a missing tokenizer
file, ControlNet and IP-Adapter pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnmem
from attnmem import cli, pipelines
from attnmem.errors import PipelineError
from attnmem.pipelines import LoadOptions, load_pipeline, resolve_device, resolve_dtype
from attnmem.testing import tiny_sd1_pipeline

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("a photo of a cat\n", encoding="utf-8")
    return p


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mistyped_builtin_name_lists_the_names_without_the_hub(monkeypatch):
    from diffusers import DiffusionPipeline

    def no_hub(*a, **kw):
        raise AssertionError("went to the hub")

    monkeypatch.setattr(DiffusionPipeline, "load_config", no_hub)
    with pytest.raises(PipelineError, match=r"Did you mean testbed\?.*testbed, tiny-sd1"):
        load_pipeline("testbd", CPU, F32)
    with pytest.raises(PipelineError, match="Built-in names: testbed"):
        load_pipeline("stable-diffusion", CPU, F32)


@pytest.mark.slow
def test_unreachable_hub_says_so(tmp_path):
    code = (
        "import torch\nfrom attnmem.pipelines import load_pipeline\n"
        "from attnmem.errors import PipelineError\n"
        "try:\n    load_pipeline('someone/some-model', torch.device('cpu'), torch.float32)\n"
        "except PipelineError as e:\n    print(e)\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    env.pop("HF_HUB_OFFLINE", None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert "the Hugging Face hub cannot be reached" in res.stdout, res.stdout + res.stderr
    assert "--local-files-only" in res.stdout


def test_local_files_only_says_the_model_is_not_cached(tmp_path):
    with pytest.raises(PipelineError, match="not in the local hub cache"):
        load_pipeline("someone/not-cached-anywhere", CPU, F32, LoadOptions(local_files_only=True))


def test_variant_loads_the_variant_weights(tmp_path, pipe, prompts):
    folder = tmp_path / "tiny"
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    assert list(folder.glob("unet/*.fp16.safetensors"))
    with pytest.raises(PipelineError, match="could not load"):
        load_pipeline(str(folder), CPU, F32)
    loaded = load_pipeline(str(folder), CPU, F32, LoadOptions(variant="fp16"))
    torch.testing.assert_close(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight, atol=0, rtol=0)
    out = tmp_path / "r.jsonl"
    assert run("scan", prompts, "--model", folder, "--variant", "fp16", "--out", out, "-q") == 0
    assert read(out)[0]["load"] == {"variant": "fp16"}


def test_revision_and_local_files_only_reach_from_pretrained(monkeypatch):
    from diffusers import DiffusionPipeline

    seen = {}

    def load_config(model, **kw):
        seen["config"] = kw
        return {}

    def from_pretrained(model, **kw):
        seen["pretrained"] = kw
        raise RuntimeError("stop here")

    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    opts = LoadOptions(revision="v1.0", local_files_only=True, variant="fp16")
    with pytest.raises(PipelineError):
        load_pipeline("owner/name", CPU, F32, opts)
    assert seen["config"] == {"revision": "v1.0", "local_files_only": True}
    p = seen["pretrained"]
    assert p["revision"] == "v1.0" and p["local_files_only"] and p["variant"] == "fp16"
    assert p["use_safetensors"] is True and p["trust_remote_code"] is False


def test_single_file_checkpoints(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(PipelineError, match="must be .safetensors; a .ckpt file is a pickle"):
        load_pipeline(str(pickle), CPU, F32)

    seen = []

    def fake(cls):
        def from_single_file(path, **kw):
            seen.append((cls.__name__, path, kw))
            return tiny_sd1_pipeline()

        return from_single_file

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", fake(StableDiffusionPipeline))
    monkeypatch.setattr(
        StableDiffusionXLPipeline, "from_single_file", fake(StableDiffusionXLPipeline)
    )
    sd = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, sd)
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, xl)
    load_pipeline(str(sd), CPU, F32, LoadOptions(config="cfg-folder", local_files_only=True))
    load_pipeline(str(xl), CPU, F32)
    (name0, path0, kw0), (name1, path1, kw1) = seen
    assert name0 == "StableDiffusionPipeline" and path0 == str(sd)
    assert kw0["config"] == "cfg-folder" and kw0["local_files_only"] is True
    assert kw0["safety_checker"] is None
    assert name1 == "StableDiffusionXLPipeline" and "config" not in kw1


def test_lora_changes_the_model(tmp_path, pipe, prompts):
    pytest.importorskip("peft")  # a test dependency ([test] extra)
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path / "tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    tuned = tiny_sd1_pipeline()
    tuned.unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_k", "to_v"], init_lora_weights=False)
    )
    lora = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(
        lora, unet_lora_layers=get_peft_model_state_dict(tuned.unet)
    )
    base, with_lora = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run("scan", prompts, "--model", folder, "--out", base, "-q") == 0
    assert run("scan", prompts, "--model", folder, "--lora", lora, "--out", with_lora, "-q") == 0
    a, b = read(base)[0], read(with_lora)[0]
    assert a["score"] != b["score"] and b["load"] == {"lora": [str(lora)]}
    assert (
        run(
            "scan",
            prompts,
            "--model",
            folder,
            "--lora",
            tmp_path / "none",
            "--out",
            tmp_path / "c.jsonl",
        )
        == 1
    )


def test_device_auto_picks_mps_where_available_and_mps_is_refused_here(monkeypatch):
    assert resolve_device("auto").type == "cpu"  # this machine: no CUDA, no MPS
    with pytest.raises(PipelineError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(PipelineError, match="cpu, cuda .* or mps, not meta"):
        resolve_device("meta")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16


def test_device_mps_on_the_command_line(tmp_path, prompts, capsys):
    assert run("scan", prompts, "--device", "mps", "--out", tmp_path / "r.jsonl") == 1
    err = capsys.readouterr().err
    assert "MPS is not available" in err and "Traceback" not in err


def test_layer_out_of_range_is_refused_before_scoring(tmp_path, prompts, capsys):
    out = tmp_path / "r.jsonl"
    assert run("scan", prompts, "--model", "tiny-sd1", "--layer", 11, "--out", out) == 1
    err = capsys.readouterr().err
    assert "this model has 11 cross-attention layers, so give an index in -11..10" in err
    assert not out.exists()  # nothing was scored
    assert run("scan", prompts, "--model", "tiny-sd1", "--layer", "mid_blok", "--out", out) == 1
    assert "names no cross-attention layer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out of range"):
        attnmem.make_detector("E", tiny_sd1_pipeline(), layer=-12)


def test_missing_tokenizer_file_is_one_line(tmp_path, prompts, monkeypatch, capsys):
    import attnmem.tokenizer as tk

    monkeypatch.setattr(tk, "_BUNDLED_BPE", tmp_path / "gone.txt.gz")
    tk._build.cache_clear()
    try:
        assert run("scan", prompts, "--model", "tiny-sd1", "--out", tmp_path / "r.jsonl") == 1
    finally:
        tk._build.cache_clear()
    err = capsys.readouterr().err
    assert "installation is incomplete" in err and "Traceback" not in err


def test_folder_missing_a_tokenizer_file_is_named(tmp_path, pipe, prompts, capsys):
    folder = tmp_path / "tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    assert run("scan", prompts, "--model", folder, "--out", tmp_path / "r.jsonl") == 1
    err = capsys.readouterr().err
    assert "files are missing from the tokenizer/ folder" in err and "Traceback" not in err


def _controlnet_pipeline():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_sd1_pipeline()
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=(8, 16, 16)
    )
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_pipelines_work_from_python_and_are_refused_by_the_commands():
    pipe = _controlnet_pipeline()
    image = torch.rand(1, 3, 32, 32)
    kw = dict(image=image, num_inference_steps=2, output_type="np")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe(["a photo of a cat"], generator=g(), **kw).images
    with attnmem.patch(pipe) as h:
        same = pipe(["a photo of a cat"], generator=g(), **kw).images
    assert len(h.record.layers) == 11 and h.record.steps == [0, 1]  # the UNet's attn2 layers
    torch.testing.assert_close(torch.tensor(same), torch.tensor(plain), atol=1e-4, rtol=0)
    with attnmem.patch(pipe, record=False, mitigate=attnmem.Mitigation(bos_scale=2.0)):
        mitigated = pipe(["a photo of a cat"], generator=g(), **kw).images
    assert abs(mitigated - plain).max() > 1e-3
    with pytest.raises(PipelineError, match="ControlNet pipeline .* needs a conditioning image"):
        pipelines.check_job_pipeline(pipe, "cn")


def test_ip_adapter_is_refused_clearly():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = tiny_sd1_pipeline()
    for name, m in pipe.unet.named_modules():
        if name.endswith("attn2"):
            m.set_processor(
                IPAdapterAttnProcessor2_0(m.inner_dim, m.cross_attention_dim, num_tokens=(4,))
            )
    with pytest.raises(ValueError, match=r"IP-Adapter processor.*unload_ip_adapter"):
        attnmem.patch(pipe)
