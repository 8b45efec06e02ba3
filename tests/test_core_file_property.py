"""Property: a re-hashed file (valid checksum) with randomly edited metadata values or keys either
is refused (SerialLoraFileError naming the file and the field or key; `serial-lora info` exits 2;
the model bit-identical to before) or loads to exactly what its metadata says (the clean load's
outputs when the edit changes no number, else the hand formula with the file's scaling)."""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_models import HOSTS, assert_unchanged, hand_merged_reference, run, snapshot, target_model
from serial_lora_core import SerialLoraFileError, load_serial_lora, read_file, serial_lora_modules
from serial_lora_core.cli import main
from serial_lora_core.format import write_file

CASE = HOSTS["fused"]
INTERESTING = ["", "0", "1", "2", "3", "4", "-1", "6.0", "0.5", "1e300", "1e38", "nan", "inf", "true", "false", "True",
               "²", "٤", "[]", "{}", "null", '{"input": ["qkv"]}', '{"input": ["proj"]}', '{"input": ["q_proj"]}',
               '{"text": ["qkv"]}', '{"input": ["qkv"], "input": ["qkv"]}', '["fused_qkv"]', '["head"]', "float16",
               "float32", "bfloat16", "serial_lora", "lora", "6.0\n", " 4", "4 ", "0x4", "1_0", "\x1b[31m"]
KEY_EDITS = [lambda k: k + "\n", lambda k: k + " ", lambda k: "x." + k, lambda k: k.replace("0", "1"),
             lambda k: k.replace("0", "7"), lambda k: k.replace("0", "٠"), lambda k: k.replace("down", "up"),
             lambda k: k.replace("input", "text"), lambda k: k.replace(".weight", ""), lambda k: k.upper(),
             lambda k: k.replace("blocks.", "blocks..", 1), lambda k: k.replace("attn.", "", 1),
             lambda k: "modules_to_save." + k, lambda k: k.replace("serial_lora", "serial_lora.input.serial_lora")]


def values(original: str):
    return st.one_of(
        st.sampled_from(INTERESTING),
        st.text(max_size=12),
        st.integers(-3, 10).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.tuples(st.integers(0, len(original)), st.text(min_size=1, max_size=3)).map(lambda t: original[: t[0]] + t[1] + original[t[0]:]),
        st.integers(0, max(0, len(original) - 1)).map(lambda i: original[:i]),
    )


@st.composite
def edits(draw, metadata: dict[str, str], keys: list[str]):
    """(what was edited: field or key, edited metadata, key renames)."""
    kind = draw(st.sampled_from(["value", "value", "value", "delete", "add", "key"]))
    meta = {k: v for k, v in metadata.items() if k != "sha256"}
    if kind == "key":
        key = draw(st.sampled_from(keys))
        return ("key", key, draw(st.sampled_from(KEY_EDITS))(key)), meta
    if kind == "add":
        field = draw(st.sampled_from(["modules_to_save", "note", "dropout_extra"]))
        meta[field] = draw(values(""))
        return ("field", field, None), meta
    field = draw(st.sampled_from(sorted(meta)))
    if kind == "delete":
        del meta[field]
    else:
        meta[field] = draw(values(meta[field]))
    return ("field", field, None), meta


def _scaling_by_hand(metadata: dict[str, str]) -> float:
    rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    return alpha / (math.sqrt(rank) if metadata["use_rslora"] == "true" else rank)


def test_rehashed_random_edits_are_refused_or_load_exactly(context, tmp_path):
    pristine = target_model(CASE)
    inputs = CASE.inputs()
    clean = copy.deepcopy(pristine)
    load_serial_lora(clean, context.good)
    clean_output = run(clean, inputs)
    keys = sorted(context.tensors)
    numbers = ("rank", "alpha", "use_rslora")
    path = tmp_path / "edited.safetensors"
    outcomes = collections.Counter()

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(edits(context.metadata, keys))
    def check(edit):
        (kind, name, new_key), metadata = edit
        tensors = dict(context.tensors)
        if new_key is not None:
            tensors[new_key] = tensors.pop(name)
        write_file(path, tensors, metadata)
        model = copy.deepcopy(pristine)
        before = snapshot(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an edited architecture name warns and loads
                load_serial_lora(model, path)
        except SerialLoraFileError as error:
            message = str(error)
            assert str(path) in message
            if kind == "field":
                assert name in message, (name, message)
            else:
                shown = {repr(new_key)[1:-1], name, new_key.removesuffix(".weight")}
                assert any(s and s in message for s in shown) or "serial_lora." in message, (new_key, message)
            assert_unchanged(model, before)
            outcomes["refused"] += 1
        else:
            output = run(model, inputs)
            if new_key is None and all(metadata.get(f) == context.metadata[f] for f in numbers):
                assert torch.equal(output, clean_output), (name, metadata.get(name))
                outcomes["same"] += 1
            else:
                scaling = _scaling_by_hand(metadata)
                assert {a.scaling for _, m in serial_lora_modules(model) for a in m["default"].values()} == {scaling}
                if abs(scaling) <= 100:  # beyond, float32 and float64 runs of the model part ways (saturation)
                    reference = hand_merged_reference(pristine, model, {"default": scaling})
                    expected = run(reference, tuple(x.double() for x in inputs))
                    torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-4)
                outcomes["formula"] += 1
        # The command line: exit 0, or 2 with the file named in one line (always when the reader
        # refuses the file); never a traceback.
        try:
            read_file(path)
            readable = True
        except SerialLoraFileError:
            readable = False
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["info", str(path)])
        assert code in (0, 2) and (readable or code == 2)
        assert code == 0 or (str(path) in err.getvalue() and err.getvalue().count("\n") == 1)
        outcomes[f"info exit {code}"] += 1

    check()
    assert outcomes["refused"] >= 100 and outcomes["same"] >= 20 and outcomes["formula"] >= 5, outcomes
