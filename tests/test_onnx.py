"""ONNX export and engine on the tiny checkpoint: graph parity with PyTorch, score / answer parity with hf, int8."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from conftest import ONNX_FRAME, synthetic_frames  # noqa: E402

from tpru_agent.engines.base import GenerationOptions, Request  # noqa: E402
from tpru_agent.engines.chat import common_prefix, expand_image_pads, render_chat, rope_index  # noqa: E402
from tpru_agent.errors import ConfigError, ModelNotFoundError  # noqa: E402
from tpru_agent.hub import ONNX_MANIFEST, resolve  # noqa: E402
from tpru_agent.onnx.export import parse_frame_size, read_manifest  # noqa: E402
from tpru_agent.tasks import continuation, ordering, render_prompt  # noqa: E402

FRAME = ONNX_FRAME  # the size of conftest's synthetic frames: hf and onnx then see the same pixels (onnx_dir: conftest)


def questions(frames: list) -> list:
    """The fixed 8-question set (:func:`tpru_agent.testing.sample_requests`)."""
    from tpru_agent.testing import sample_requests

    return sample_requests(frames)


def fast_answer(engine, request: Request) -> tuple[str, list[float]]:
    """The fast-mode answer (argmax of ``score`` over every valid answer) and the scores."""
    answers = request.question.answers()
    scores = engine.score(request, [continuation(a) for a in answers])
    return answers[int(np.argmax(scores))], scores


@pytest.fixture(scope="module")
def int8_dir(onnx_dir, tmp_path_factory):
    from tpru_agent.onnx.export import quantize_onnx

    return quantize_onnx(onnx_dir, tmp_path_factory.mktemp("onnx") / "int8")


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from tpru_agent.engines.hf import HFEngine

    return HFEngine(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ort(onnx_dir):
    from tpru_agent.engines.onnx import ONNXEngine

    return ONNXEngine(onnx_dir, device="cpu", threads=1)


@pytest.fixture(scope="module")
def requests_set():
    return questions(synthetic_frames(4))


# ------------------------------------------------------------------------------------------ export
def test_export_writes_graphs_manifest_and_processor_files(onnx_dir, tiny_checkpoint):
    import onnx

    manifest = read_manifest(onnx_dir)
    assert manifest["precision"] == "fp32" and manifest["opset"] == 17
    assert manifest["source_folder"] == str(tiny_checkpoint)
    assert manifest["frame"] == {"width": 196, "height": 168, "grid_thw": [1, 12, 14], "tokens": 42}
    assert manifest["text"]["num_layers"] == 2 and manifest["text"]["hidden_size"] == 128
    assert set(manifest["graphs"]) == {"vision", "embed", "decoder"}
    for graph in manifest["graphs"].values():
        onnx.checker.check_model(str(onnx_dir / graph["file"]))
        assert graph["bytes"] == (onnx_dir / graph["file"]).stat().st_size
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert name in manifest["processor_files"] and (onnx_dir / name).is_file()
    assert resolve(str(onnx_dir)).is_onnx and not resolve(str(tiny_checkpoint)).is_onnx
    assert not list(onnx_dir.parent.glob(".fp32.*"))  # no temporary folder left behind


@pytest.mark.parametrize("text, expected", [
    (None, (196, 196)), ("196x168", (196, 168)), ("224X168", (224, 168)), ((168, 196), (168, 196)),
])
def test_parse_frame_size(text, expected):
    assert parse_frame_size(text) == expected


@pytest.mark.parametrize("text", ["200x168", "196", "axb", "0x168", (196, 170)])
def test_parse_frame_size_rejects(text):
    with pytest.raises(ConfigError, match="frame size"):
        parse_frame_size(text)


# ------------------------------------------------------------------------------------------ graph parity
def test_prefill_logits_and_cached_decode_step_match_pytorch(hf, ort):
    """Every position's logits of a 4-frame prompt, then one step on the cache, within 1e-4 of PyTorch."""
    from transformers import DynamicCache

    frames = synthetic_frames(4)
    q = ordering.build(4, description="making coffee")
    request = Request(q, render_prompt(q.problem), tuple(frames))
    inputs = hf.processor(text=[hf.chat_text(request)], images=frames, return_tensors="pt")
    ids = inputs["input_ids"]
    model = hf.model
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        ref = model(**inputs, cache=cache, use_cache=True)
        nxt = torch.tensor([[int(ref.logits[0, -1].argmax())]])
        step_pos = (ids.shape[1] + model.model.rope_deltas).view(1, 1, 1).expand(3, 1, 1)  # transformers' own delta
        ref_step = model(input_ids=nxt, position_ids=step_pos, cache=cache, use_cache=True)
    id_list = ids[0].tolist()
    feats, _ = ort._vision(frames)
    positions, delta = rope_index(id_list, ort.image_id, [ort.grid] * 4, ort.merge)
    embeds = ort._embed(id_list)
    embeds[0, np.flatnonzero(ids[0].numpy() == ort.image_id)] = np.concatenate(feats)
    n = len(id_list)
    logits, kv = ort._decode(embeds, positions[:, None], n, np.arange(n), None)
    assert np.abs(logits[0] - ref.logits[0].numpy()).max() < 1e-4
    step = np.full((3, 1, 1), n + delta, dtype=np.int64)
    logits_step, kv2 = ort._decode(ort._embed(nxt[0].tolist()), step, n + 1, np.zeros(1, dtype=np.int64), kv)
    assert np.abs(logits_step[0, -1] - ref_step.logits[0, -1].numpy()).max() < 1e-4
    assert kv2[0].shape[2] == n + 1
    assert np.abs(kv2[0] - cache.layers[0].keys.numpy()).max() < 1e-4


# ------------------------------------------------------------------------------------------ engine parity
def test_prompt_tokens_and_positions_match_the_processor(hf, ort, requests_set):
    for request in requests_set[::3]:
        text = hf.chat_text(request, reply="<think>x</think>")
        assert ort.chat_text(request, reply="<think>x</think>") == text
        inputs = hf.processor(text=[text], images=list(request.images), return_tensors="pt")
        ids = ort._encode(expand_image_pads(text, [ort.frame_tokens] * len(request.images)))
        assert ids == inputs["input_ids"][0].tolist()
        grids = inputs["image_grid_thw"]
        mm = (inputs["input_ids"] == ort.image_id).int()
        ref, ref_delta = hf.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=mm, image_grid_thw=grids)
        positions, delta = rope_index(ids, ort.image_id, grids.tolist(), ort.merge)
        assert np.array_equal(positions, ref[:, 0].numpy()) and delta == int(ref_delta)


def test_rope_index_mixed_grids_and_text_only():
    ids = [5, 9, 9, 9, 9, 6, 9, 9, 9, 9, 9, 9, 7]  # a 2x2 then a 2x3 merged grid (image token 9)
    positions, delta = rope_index(ids, 9, [(1, 4, 4), (1, 4, 6)], 2)
    assert positions[:, 0].tolist() == [0, 0, 0]
    assert positions[:, 1:5].T.tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]
    assert positions[:, 5].tolist() == [3, 3, 3]  # resumes at start + max(rows, cols)
    assert positions[:, 12].tolist() == [7, 7, 7] and delta == 8 - 13
    text, d = rope_index([1, 2, 3], 9, [], 2)
    assert text.tolist() == [[0, 1, 2]] * 3 and d == 0
    with pytest.raises(ConfigError):
        rope_index(ids, 9, [(1, 4, 4)], 2)


def test_chat_helpers():
    assert render_chat("{% for m in messages %}[{{ m.role }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}",
                       [{"role": "user", "content": "x"}]) == "[user]>"
    assert expand_image_pads("a<|image_pad|>b<|image_pad|>", [2, 1]) == "a" + "<|image_pad|>" * 2 + "b<|image_pad|>"
    with pytest.raises(ConfigError):
        expand_image_pads("a<|image_pad|>", [1, 1])
    assert common_prefix([[1, 2, 3], [1, 2], [1, 2, 4]]) == 2


@pytest.mark.parametrize("prefix", ["", "<think>The arm moves the cup.</think>"])
def test_score_matches_hf_engine(hf, ort, requests_set, prefix):
    for request in (requests_set[0], requests_set[4]):  # 24 permutations; a 5-letter multiple choice over 7 images
        conts = [continuation(a) for a in request.question.answers()]
        ref = hf.score(request, conts, prefix=prefix)
        got = ort.score(request, conts, prefix=prefix)
        assert np.abs(np.subtract(ref, got)).max() < 1e-4


def test_same_answers_fast_and_greedy(hf, ort, requests_set):
    options = GenerationOptions(max_new_tokens=24)
    for request in requests_set:
        assert fast_answer(ort, request)[0] == fast_answer(hf, request)[0]
        assert ort.generate([request], options) == hf.generate([request], options)


def test_cache_reuse_gives_the_same_scores(ort, requests_set):
    request = requests_set[1]
    conts = [continuation(a) for a in request.question.answers()]
    ort.clear_cache()
    cold = ort.score(request, conts)
    ort.generate([request], GenerationOptions(max_new_tokens=5))  # leaves prompt + reply key/values cached
    warm = ort.score(request, conts)
    assert np.abs(np.subtract(cold, warm)).max() < 1e-5


def test_int8_answers_agree_and_drift_is_small(ort, int8_dir, requests_set, record_property):
    from tpru_agent.engines.onnx import ONNXEngine

    manifest = read_manifest(int8_dir)
    assert manifest["precision"] == "int8" and manifest["quantized_graphs"] == ["decoder"]
    assert manifest["graphs"]["decoder"]["bytes"] < 0.5 * read_manifest(ort.folder)["graphs"]["decoder"]["bytes"]
    int8 = ONNXEngine(int8_dir, device="cpu", threads=1)
    drift, agree, clear = [], 0, 0
    for request in requests_set:
        a, sa = fast_answer(ort, request)
        b, sb = fast_answer(int8, request)
        d = float(np.abs(np.subtract(sa, sb)).max())
        top2 = np.sort(np.asarray(sa, dtype=float))[-2:]
        # int8 may only flip an answer whose fp32 margin it can cross: a near-tie of the random model.
        if top2[1] - top2[0] > 2 * d:
            clear += 1
            assert a == b, f"int8 flipped a clear fp32 answer (margin {top2[1] - top2[0]:.4f}, drift {d:.4f})"
        agree += a == b
        drift.append(d)
    record_property("int8_score_drift_max", max(drift))
    record_property("int8_fast_agree", f"{agree}/{len(requests_set)}")
    logging.getLogger(__name__).info("int8: %d/%d fast answers agree, max log-prob drift %.4f", agree,
                                     len(requests_set), max(drift))
    assert clear >= len(requests_set) // 2, f"only {clear} answers had a margin above the int8 drift"
    assert agree >= len(requests_set) - 1, f"int8 fast answers agree on {agree}/{len(requests_set)}; drift {drift}"
    assert 0 < max(drift) < 0.1, f"int8 log-prob drift {drift}"


# ------------------------------------------------------------------------------------------ facade, CLI, errors
def test_facade_picks_onnx_for_an_export_folder(onnx_dir, tiny_checkpoint):
    from tpru_agent import TPRU

    model = TPRU(onnx_dir)
    assert model.engine_name == "onnx"
    result = model.order_frames(synthetic_frames(4), mode="fast")
    ref = TPRU(tiny_checkpoint, engine="hf").order_frames(synthetic_frames(4), mode="fast")
    assert result.engine == "onnx" and result.order == ref.order
    assert abs(result.confidence - ref.confidence) < 1e-4


def test_bad_export_folders_raise_typed_errors(tmp_path, onnx_dir, tiny_checkpoint):
    from tpru_agent.engines.onnx import ONNXEngine
    from tpru_agent.onnx.export import export_onnx

    with pytest.raises(ModelNotFoundError, match="tpru export"):
        ONNXEngine(tiny_checkpoint)  # a transformers folder, not an export
    with pytest.raises(ModelNotFoundError, match="no tpru_onnx.json"):
        read_manifest(tmp_path)
    (tmp_path / ONNX_MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ONNXEngine(tmp_path)
    manifest = json.loads((onnx_dir / ONNX_MANIFEST).read_text(encoding="utf-8"))
    (tmp_path / ONNX_MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelNotFoundError, match="incomplete: 'vision.onnx' is missing"):
        ONNXEngine(tmp_path)
    (tmp_path / ONNX_MANIFEST).write_text(json.dumps(dict(manifest, version=99)), encoding="utf-8")
    with pytest.raises(ConfigError, match="format version 99"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        export_onnx(tiny_checkpoint, onnx_dir)
    with pytest.raises(ConfigError, match="device"):
        ONNXEngine(onnx_dir, device="tpu")


@pytest.mark.parametrize("device, available, first, explicit", [
    ("auto", ["CPUExecutionProvider"], "CPUExecutionProvider", False),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider", False),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CPUExecutionProvider", False),
    ("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider", True),
    ("cuda", ["CPUExecutionProvider"], "CPUExecutionProvider", False),
])
def test_pick_providers(device, available, first, explicit, caplog):
    from tpru_agent.engines.onnx import pick_providers

    with caplog.at_level(logging.WARNING):
        providers, wants_cuda = pick_providers(device, available)
    name = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    assert name == first and wants_cuda == explicit
    warned = [r for r in caplog.records if "running on the CPU" in r.getMessage()]
    assert len(warned) == (1 if device == "cuda" else 0)
    if device == "cuda:1":
        assert providers[0][1] == {"device_id": 1}


def test_cli_export_int8_with_external_data(tmp_path, tiny_checkpoint, ort, requests_set):
    from click.testing import CliRunner

    from tpru_agent.cli.main import cli
    from tpru_agent.engines.onnx import ONNXEngine

    out = tmp_path / "exp"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--int8",
                                      "--frame-size", FRAME, "--external-data", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["precision"] == "int8" and manifest["graphs"]["embed"]["data"] == ["embed.onnx.data"]
    assert (out / "embed.onnx.data").stat().st_size > 500_000  # the weights live outside the graph
    engine = ONNXEngine(out, threads=1)
    assert fast_answer(engine, requests_set[0])[0] == fast_answer(ort, requests_set[0])[0]
    again = CliRunner().invoke(cli, ["export", "--model", str(tiny_checkpoint), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_save_graph_gathers_spilled_weights_into_one_file(tmp_path, onnx_dir):
    """Graphs over 2 GB come out of the exporter with one file per weight; they are gathered into <graph>.data."""
    import onnx

    from tpru_agent.onnx.export import _save_graph

    raw = tmp_path / "raw"
    raw.mkdir()
    graph = onnx.load(str(onnx_dir / "embed.onnx"))
    onnx.save_model(graph, str(raw / "embed.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(raw.iterdir())) > 1
    info = _save_graph(raw / "embed.onnx", tmp_path / "embed.onnx", None)
    assert info["data"] == [] and not list(raw.iterdir())  # small: weights back inside the graph
    assert info["bytes"] == (tmp_path / "embed.onnx").stat().st_size > 500_000


def test_engine_runs_without_torch(onnx_dir):
    """The onnx engine itself needs no torch / transformers (frames already at the export size)."""
    code = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from tpru_agent.engines.onnx import ONNXEngine\n"
        "from tpru_agent.engines.base import Request\n"
        "from tpru_agent.tasks import ordering, render_prompt, continuation\n"
        f"e = ONNXEngine({str(onnx_dir)!r}, threads=1, image_cache=0)\n"
        "frames = [Image.fromarray(np.full((168, 196, 3), 40 * i, np.uint8)) for i in range(4)]\n"
        "q = ordering.build(4)\n"
        "s = e.score(Request(q, render_prompt(q.problem), tuple(frames)), [continuation(a) for a in q.answers()])\n"
        "assert len(s) == 24\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_export_never_overwrites_the_source_or_foreign_files(tiny_checkpoint, tmp_path):
    from tpru_agent.errors import ConfigError
    from tpru_agent.onnx.export import export_onnx

    with pytest.raises(ConfigError, match="source model"):
        export_onnx(tiny_checkpoint, tiny_checkpoint, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an ONNX export"):
        export_onnx(tiny_checkpoint, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
