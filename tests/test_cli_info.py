"""`fastopt info`'s optimizer-state table: bytes per param element under each
state_dtype, counted from real optimizers (compact state 2x / ~4x smaller)."""

from __future__ import annotations

import re

from fastopt.cli import main
from fastopt.cli.info import state_bytes


def test_state_bytes_per_element_follow_the_state_dtype():
    f32 = state_bytes("AdamW", {}, "float32")
    assert f32 == 8.0                                   # m and v, 4 bytes each
    assert state_bytes("AdamW", {}, "bfloat16") == f32 / 2
    int8 = state_bytes("AdamW", {}, "int8")
    assert f32 / 4 < int8 < f32 / 4 * 1.02               # codes plus a float32 absmax per block
    assert state_bytes("SGD", dict(lr=0.1, momentum=0.9), "float32") == 4.0
    assert state_bytes("LAMB", {}, "bfloat16") is None   # refused: no compact state


def test_info_prints_the_state_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "state_dtype float32 / bfloat16 / int8" in out
    row = re.search(r"Adam, AdamW\s+([\d.]+) / ([\d.]+) / ([\d.]+)", out)
    assert row and [float(x) for x in row.groups()] == [8.0, 4.0, 2.03]
    assert re.search(r"LAMB\s+8\.00 / - / -", out)


def test_info_json_holds_what_the_text_says(capsys):
    import json

    import fastopt
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["fastopt"] == fastopt.__version__
    assert facts["auto_backend"] in facts["backends"]
    assert facts["backends"]["numpy"]["available"] is True
    assert facts["threads"]["fastopt_threads"] == fastopt.get_num_threads()
    assert facts["state_bytes_per_element"]["Adam, AdamW"]["bfloat16"] == 4.0
    assert facts["state_bytes_per_element"]["LAMB"]["int8"] is None
    assert main(["info"]) == 0           # the text says the same facts
    text = capsys.readouterr().out
    assert text.startswith(f"fastopt {facts['fastopt']}\n")
    assert f"backend='auto' picks {facts['auto_backend']!r}" in text
    assert f"threads: fastopt {facts['threads']['fastopt_threads']}," in text
