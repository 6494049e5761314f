"""Checkpoints: exact resume (also across processes), clear errors that
change nothing, and the .npz format (no pickle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from conftest import BACKENDS, assert_same_tree, snapshot

import fastopt
from fastopt import schedules as S

SHAPES = [(40, 30), (30,), (5, 3)]


def make_params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return fastopt.pack([rng.standard_normal(s).astype(dtype) for s in SHAPES])


def grad_at(params, t, seed=100):
    g = params.zeros_like()
    g.data[:] = np.random.default_rng(seed + t).standard_normal(g.data.size) * 3
    if t == 3:
        g.data[7] = np.nan          # a skipped step inside the run
    return g


def make_opt(kind, params, backend):
    sched = S.warmup_cosine(1e-2, 2, 9, alpha=0.1)
    if kind == "adamw":
        return fastopt.AdamW(params, lr=sched, amsgrad=True, backend=backend,
                             max_grad_norm=5.0, skip_nonfinite=True)
    if kind == "adam":
        return fastopt.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}],
                            lr=S.step_decay(1e-2, 0.5, milestones=[2, 5]), weight_decay=0.1,
                            backend=backend, skip_nonfinite=True)
    return fastopt.SGD(params, lr=S.exponential(0.05, 0.9), momentum=0.9, nesterov=True,
                       backend=backend, skip_nonfinite=True)


def run(opt, params, start, stop):
    for t in range(start, stop):
        opt.step(grad_at(params, t))


def full_snapshot(opt, params):
    return {"params": [np.array(p, copy=True) for p in params], "state": snapshot(opt.state),
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "counts": (opt.iterations, opt.skipped_steps, opt.max_grad_norm,
                       opt.skip_nonfinite)}


N, K = 8, 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_resume_is_bit_exact(tmp_path, backend, kind):
    p_ref = make_params()
    o_ref = make_opt(kind, p_ref, backend)
    run(o_ref, p_ref, 0, N)

    p = make_params()
    o = make_opt(kind, p, backend)
    run(o, p, 0, K)
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=o)
    p2 = make_params(seed=9)                     # a fresh model with other values
    o2 = make_opt(kind, p2, backend)
    fastopt.load(tmp_path / "c.npz", params=p2, optimizer=o2)
    run(o2, p2, K, N)
    assert_same_tree(full_snapshot(o2, p2), full_snapshot(o_ref, p_ref))
    assert o2.skipped_steps == 1


def test_resume_in_a_fresh_process(tmp_path):
    """k steps here, save; N - k steps in a new Python process, per backend."""
    ckpts = {}
    for backend in BACKENDS:
        p = make_params()
        o = make_opt("adamw", p, backend)
        run(o, p, 0, K)
        ckpts[backend] = str(tmp_path / f"{backend}.npz")
        fastopt.save(ckpts[backend], params=p, optimizer=o, extra={"backend": backend})
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import fastopt
        from test_checkpoint import make_params, make_opt, run
        for backend, path in {ckpts!r}.items():
            p = make_params(seed=3)
            o = make_opt("adamw", p, backend)
            assert fastopt.load(path, params=p, optimizer=o)["extra"] == {{"backend": backend}}
            run(o, p, {K}, {N})
            fastopt.save(path + ".out.npz", params=p, optimizer=o)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    for backend, path in ckpts.items():
        p = make_params()
        o = make_opt("adamw", p, backend)
        run(o, p, 0, N)
        got = fastopt.checkpoint.read(path + ".out.npz")
        assert_same_tree(got["params"], [np.array(a) for a in p])
        assert_same_tree(got["optimizer"], o.state_dict())


def test_state_dict_round_trip_independent_of_packing():
    packed = make_params()
    o = make_opt("adamw", packed, "numpy")
    run(o, packed, 0, 3)
    sd = o.state_dict()
    loose = [np.array(a, copy=True) for a in packed]          # one run per array
    o2 = fastopt.AdamW(loose, backend="numpy")
    with pytest.warns(UserWarning, match="replaces"):     # make_opt's settings: the checkpoint's
        o2.load_state_dict(sd)
    for t in range(3, 6):
        g = grad_at(packed, t)
        o.step(g)
        o2.step([np.array(x) for x in g])
    for a, b in zip(packed, loose):
        assert a.tobytes() == b.tobytes()


def test_state_dict_is_a_copy_and_json_safe():
    p = make_params()
    o = make_opt("sgd", p, "numpy")
    run(o, p, 0, 2)
    sd = o.state_dict()
    buf = sd["state"][0]["buffers"]["momentum_buffer"]
    before = buf.copy()
    run(o, p, 2, 3)
    assert buf.tobytes() == before.tobytes()
    meta = {k: v for k, v in sd.items() if k != "state"}
    assert json.loads(json.dumps(meta)) == meta


def test_file_format_has_no_pickle(tmp_path):
    p = make_params()
    o = make_opt("adamw", p, "numpy")
    run(o, p, 0, 2)
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=o, extra={"note": "x", "w": np.arange(3)})
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(str(z["__meta__"]))
    assert meta["format"] == "fastopt-checkpoint/1"
    back = fastopt.load(tmp_path / "c.npz")
    assert back["extra"]["note"] == "x" and back["extra"]["w"].tolist() == [0, 1, 2]


def test_params_given_as_the_optimizers_param_groups(tmp_path):
    """The list of group dicts the optimizer took was refused by save and
    load ("params[0] must be an ndarray, got dict"): its arrays, in group
    order, as a list."""
    W, b = np.ones((3, 2), np.float32), np.ones(2, np.float32)
    groups = [{"params": [W]}, {"params": [b], "weight_decay": 0.0}]
    opt = fastopt.AdamW(groups, lr=0.1, state_dtype="int8")
    opt.step([np.ones_like(W), np.ones_like(b)])
    fastopt.save(tmp_path / "c.npz", params=groups, optimizer=opt)
    want = snapshot([W, b]), snapshot(opt.state_dict())
    opt.step([np.ones_like(W), np.ones_like(b)])
    ck = fastopt.load(tmp_path / "c.npz", params=groups, optimizer=opt)
    assert_same_tree((snapshot([W, b]), snapshot(opt.state_dict())), want)
    assert isinstance(ck["params"], list) and len(ck["params"]) == 2
    fastopt.load(tmp_path / "c.npz", params=[W, b])        # the same as a plain list


def test_groups_by_name_save_and_load_by_name(tmp_path):
    """A named checkpoint loaded into a list of group dicts by name (a
    model's layers split between groups for their lr or weight decay) was
    loaded by position: layers of one shape swapped without a word
    (fine-tuning trial). By name now, both ways; a list saved from such
    groups still loads into them by position."""
    rng = np.random.default_rng(3)

    def model():
        return {"body": {"W": rng.standard_normal((4, 4)), "b": rng.standard_normal(4)},
                "head": {"W": rng.standard_normal((4, 4)), "b": rng.standard_normal(4)}}

    def split(m):      # weights in one group, biases in another: new dicts
        return [{"params": {k: {"W": d["W"]} for k, d in m.items()}},
                {"params": {k: {"b": d["b"]} for k, d in m.items()}, "weight_decay": 0.0}]
    saved = model()
    fastopt.save(tmp_path / "named.npz", params=saved)
    for groups_of in (split, lambda m: [{"params": {"head": m["head"]}},
                                         {"params": {"body": m["body"]}}]):
        into = model()
        fastopt.load(tmp_path / "named.npz", params=groups_of(into))
        assert_same_tree(snapshot(into), snapshot(saved))
    fastopt.save(tmp_path / "groups.npz", params=split(saved))
    assert set(fastopt.load(tmp_path / "groups.npz")["params"]) == {"body", "head"}
    into = model()
    fastopt.load(tmp_path / "groups.npz", params=into)
    assert_same_tree(snapshot(into), snapshot(saved))
    listed = [saved["body"]["W"], saved["head"]["W"], saved["body"]["b"], saved["head"]["b"]]
    fastopt.save(tmp_path / "list.npz", params=listed)
    into = model()
    fastopt.load(tmp_path / "list.npz", params=split(into))
    assert_same_tree(snapshot(into), snapshot(saved))


def test_a_negative_8bit_absmax_is_refused_as_corrupt():
    """It loaded, and the next step made the params NaN."""
    p = [np.ones(300, np.float32)]
    opt = fastopt.AdamW(p, lr=1e-3, state_dtype="int8")
    opt.step([np.ones(300, np.float32)])
    sd = opt.state_dict()
    before = snapshot(sd)
    sd["state"][0]["buffers"]["exp_avg_sq.absmax"][1] = -1.0
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg_sq.absmax'\] has negative "
                                         r"values \(blocks \[1\]...\).* corrupt"):
        opt.load_state_dict(sd)
    assert_same_tree(snapshot(opt.state_dict()), before)


def test_plain_callable_lr_cannot_be_saved_and_says_so_when_given():
    """A checkpoint hours into a run was the first to hear of it (and a
    torch LambdaLR's factor, given as lr, ran as the lr itself)."""
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\['lr'\] is a plain callable: "
                                         r"each step's lr is what it returns \(absolute.*"
                                         "cannot save it"):
        o = fastopt.SGD(np.zeros(3), lr=lambda t: 0.1, backend="numpy")
    with pytest.raises(TypeError, match="plain callable"):
        o.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # once per callable, not every step
        o.step([np.ones(3)])
        o.param_groups[0]["lr"] = fastopt.schedules.constant(0.1)
        o.step([np.ones(3)])
    with pytest.warns(UserWarning, match="plain callable"):
        o.param_groups[0]["lr"] = lambda t: 0.2      # assigned: said at the next step
        o.step([np.ones(3)])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fastopt.SGD([{"params": [np.zeros(2)]}, {"params": [np.zeros(2)]}], lr=lambda t: 0.1)
    assert len(said) == 1               # one callable, one warning (not one per group)


# -- mismatches: a clear error, and nothing changes -------------------------------

def _mutate(name):
    def f(tree):
        sd = tree["optimizer"]
        if name == "type":
            sd["type"] = "Adam"
        elif name == "missing-key":
            del sd["iterations"]
        elif name == "missing-buffer":
            del sd["state"][0]["buffers"]["exp_avg_sq"]
        elif name == "unknown-buffer":
            sd["state"][0]["buffers"]["momentum_buffer"] = sd["state"][0]["buffers"]["exp_avg"]
        elif name == "buffer-shape":
            sd["state"][0]["buffers"]["exp_avg"] = sd["state"][0]["buffers"]["exp_avg"][:-1]
        elif name == "buffer-dtype":
            b = sd["state"][0]["buffers"]
            b["exp_avg"] = b["exp_avg"].astype(np.float64)
        elif name == "param-shape":
            sd["param_groups"][0]["params"][1]["shape"] = [31]
        elif name == "bad-hyper":
            sd["param_groups"][0]["eps"] = -1.0
        elif name == "bad-schedule":
            sd["param_groups"][0]["lr"] = {"schedule": {"kind": "warp"}}
        elif name == "groups":
            sd["param_groups"].append(sd["param_groups"][0])
        elif name == "params-shape":
            tree["params"][0] = tree["params"][0][:, :2].copy()
        elif name == "params-count":
            tree["params"].pop()
        return tree
    return f


MUTATIONS = ["type", "missing-key", "missing-buffer", "unknown-buffer", "buffer-shape",
             "buffer-dtype", "param-shape", "bad-hyper", "bad-schedule", "groups",
             "params-shape", "params-count"]


@pytest.mark.parametrize("name", MUTATIONS)
def test_mismatched_checkpoint_changes_nothing(tmp_path, name):
    p = make_params()
    o = make_opt("adamw", p, "numpy")
    run(o, p, 0, 2)
    tree = _mutate(name)(fastopt.checkpoint.read(_saved(tmp_path, o, p)))
    target_p = make_params(seed=5)
    target = make_opt("adamw", target_p, "numpy")
    run(target, target_p, 0, 1)
    before = full_snapshot(target, target_p)
    with pytest.raises((fastopt.CheckpointError, ValueError, TypeError)) as err:
        apply_p = fastopt.checkpoint._prepare_params(list(target_p), tree)
        target._prepare_load(tree["optimizer"])
        apply_p()
    print(name, "->", err.value)
    assert_same_tree(full_snapshot(target, target_p), before)


def _saved(tmp_path, o, p):
    path = tmp_path / "good.npz"
    fastopt.save(path, params=p, optimizer=o)
    return path


def test_other_optimizer_type_via_file(tmp_path):
    p = make_params()
    o = make_opt("sgd", p, "numpy")
    run(o, p, 0, 2)
    path = _saved(tmp_path, o, p)
    tp = make_params(seed=2)
    t = make_opt("adamw", tp, "numpy")
    before = full_snapshot(t, tp)
    with pytest.raises(fastopt.CheckpointError, match="type SGD, not AdamW"):
        fastopt.load(path, params=tp, optimizer=t)
    assert_same_tree(full_snapshot(t, tp), before)   # params not written either


def test_damaged_file_is_called_damaged(tmp_path):
    """Bytes changed inside an entry (a failing disk): the message asked
    "is it truncated?" of a file of the right length."""
    p = make_params()
    o = make_opt("adamw", p, "numpy")
    run(o, p, 0, 2)
    data = bytearray(_saved(tmp_path, o, p).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(255 - b for b in data[mid:mid + 4])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(fastopt.CheckpointError, match="it is damaged or cut short"):
        fastopt.load(bad, params=p, optimizer=o)


@pytest.mark.parametrize("cut", [0.5, 0.95, 10])
def test_truncated_or_garbage_file(tmp_path, cut):
    p = make_params()
    o = make_opt("adamw", p, "numpy")
    run(o, p, 0, 2)
    data = _saved(tmp_path, o, p).read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[:int(len(data) * cut)] if cut < 1 else b"not a zip file" * cut)
    before = full_snapshot(o, p)
    # garbage: not an archive at all (np.load's pickle refusal advised
    # allow_pickle=True, to unpickle a file that is no checkpoint)
    match = ("not a fastopt checkpoint: not an .npz archive \\(it starts with b'not '\\)"
             if cut > 1 else "not a readable fastopt checkpoint")
    with pytest.raises(fastopt.CheckpointError, match=match) as err:
        fastopt.load(bad, params=p, optimizer=o)
    assert "pickle" not in str(err.value)
    assert_same_tree(full_snapshot(o, p), before)
    bad.write_bytes(b"")
    with pytest.raises(fastopt.CheckpointError, match="not a fastopt checkpoint: the file is "
                                                      "empty"):
        fastopt.load(bad, params=p, optimizer=o)


def test_weights_saved_with_np_savez_are_named_as_such(tmp_path):
    """A plain np.savez file was 'not a readable fastopt checkpoint (KeyError:
    ...); is it truncated?'; it is named, with its arrays and what to do."""
    path = tmp_path / "weights.npz"
    np.savez(path, W=np.ones(3), b=np.zeros(2))
    p = [np.ones(3)]
    with pytest.raises(fastopt.CheckpointError, match=r"an .npz archive but not a fastopt "
                                                      r"checkpoint \(no __meta__ entry; it "
                                                      r"holds 'W', 'b'\).*np.load the file"):
        fastopt.load(path, params=p)
    np.testing.assert_array_equal(p[0], 1.0)
    with pytest.raises(TypeError, match="a checkpoint's path is a str or os.PathLike, got int"):
        fastopt.load(3)
    with pytest.raises(TypeError, match="save needs something to write: params=, optimizer="):
        fastopt.save(tmp_path / "empty.npz")
    assert not (tmp_path / "empty.npz").exists()


@pytest.mark.parametrize("cut", [0.5, 10])
def test_read_meta_reads_extra_without_the_arrays_and_names_a_bad_file(tmp_path, cut):
    """What `fastopt train` reads while a SIGTERM's grace period passes: the
    JSON part, arrays as references; a bad file refused as read refuses it."""
    from fastopt.checkpoint import read, read_meta
    p = make_params()
    o = make_opt("adamw", p, "numpy")
    run(o, p, 0, 2)
    path = tmp_path / "ck.npz"
    fastopt.save(path, params=p, optimizer=o, extra={"run": {"epochs": [1, 2]}})
    meta, tree = read_meta(path), read(path)
    assert meta["extra"] == tree["extra"] == {"run": {"epochs": [1, 2]}}
    assert meta["format"] == tree["format"]
    assert meta["optimizer"]["iterations"] == tree["optimizer"]["iterations"] == 2
    ref = meta["params"][0]
    assert set(ref) >= {"__array__", "dtype"}
    assert isinstance(tree["params"][0], np.ndarray)
    bad = tmp_path / "bad.npz"
    data = path.read_bytes()
    bad.write_bytes(data[:int(len(data) * cut)] if cut < 1 else b"not a zip file" * cut)
    with pytest.raises(fastopt.CheckpointError, match="not a (readable )?fastopt checkpoint"):
        read_meta(bad)


def test_wrong_dtype_params(tmp_path):
    p = make_params()
    o = make_opt("adam", p, "numpy")
    run(o, p, 0, 2)
    path = _saved(tmp_path, o, p)
    p64 = make_params(np.float64)
    o64 = make_opt("adam", p64, "numpy")
    before = full_snapshot(o64, p64)
    with pytest.raises(fastopt.CheckpointError, match="float32"):
        fastopt.load(path, params=p64, optimizer=o64)
    with pytest.raises(fastopt.CheckpointError, match="float32"):
        fastopt.load(path, optimizer=o64)
    assert_same_tree(full_snapshot(o64, p64), before)


def test_params_given_by_name_are_saved_and_loaded_by_name(tmp_path):
    """A dict of params (layers nested) is saved by name and loaded by name,
    into a dict in any key order or, in the saved order, into a list; a
    missing, extra or reshaped param is named, with nothing loaded."""
    def model(v):
        return {"W": np.full((2, 3), v), "b": np.full(3, v), "out": {"W": np.full(3, v)}}

    def grads_of(p):
        return {"W": np.ones((2, 3)), "b": np.ones(3), "out": {"W": np.ones(3)}}

    params = model(1.0)
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads_of(params))
    path = tmp_path / "named.npz"
    fastopt.save(path, params=params, optimizer=opt)
    assert list(fastopt.checkpoint.read(path)["params"]) == ["W", "b", "out"]

    fresh = model(0.0)
    opt2 = fastopt.Adam(fresh, lr=0.1)
    fastopt.load(path, params=fresh, optimizer=opt2)
    for a, b in ((fresh["W"], params["W"]), (fresh["out"]["W"], params["out"]["W"])):
        np.testing.assert_array_equal(a, b)
    opt.step(grads_of(params))
    opt2.step(grads_of(fresh))
    np.testing.assert_array_equal(fresh["b"], params["b"])

    reordered = {"out": {"W": np.zeros(3)}, "b": np.zeros(3), "W": np.zeros((2, 3))}
    fastopt.load(path, params=reordered)
    np.testing.assert_array_equal(reordered["W"], fastopt.checkpoint.read(path)["params"]["W"])
    as_list = [np.zeros((2, 3)), np.zeros(3), np.zeros(3)]
    fastopt.load(path, params=as_list)
    np.testing.assert_array_equal(as_list[0], reordered["W"])

    for bad, message in (({"W": np.zeros((2, 3)), "b": np.zeros(3)}, r"\['out'\]\['W'\]"),
                         ({**model(0.0), "c": np.zeros(1)}, r"no params\['c'\]"),
                         ({**model(0.0), "b": np.zeros(4)}, r"params\['b'\] is float64\[4\]")):
        snapshot = {k: np.copy(v) for k, v in bad.items() if isinstance(v, np.ndarray)}
        with pytest.raises(fastopt.CheckpointError, match=message):
            fastopt.load(path, params=bad)
        for k, v in snapshot.items():
            np.testing.assert_array_equal(bad[k], v)
    fastopt.save(tmp_path / "list.npz", params=as_list)
    with pytest.raises(fastopt.CheckpointError, match="as a list"):
        fastopt.load(tmp_path / "list.npz", params=model(0.0))



@pytest.mark.parametrize("keys", [(0, 1), (("layer", 0, "W"), ("layer", 0, "b")), ("a", 7)])
def test_params_keyed_by_ints_or_tuples_are_saved_by_name(tmp_path, keys):
    """The optimizer takes any dict keys, but fastopt.save refused a params
    dict with int or tuple keys ("checkpoint keys must be strings"): they are
    stored as str(key), as the state_dict names them, and resume exactly."""
    def grads():
        return {keys[0]: np.ones(3), keys[1]: np.ones(2)}
    params = {keys[0]: np.ones(3), keys[1]: np.zeros(2)}
    opt = fastopt.Adam(params, lr=0.1)
    opt.step(grads())
    fastopt.save(tmp_path / "k.npz", params=params, optimizer=opt)
    assert list(fastopt.checkpoint.read(tmp_path / "k.npz")["params"]) == [str(k) if not
                                                                           isinstance(k, str)
                                                                           else k for k in keys]
    fresh = {keys[0]: np.zeros(3), keys[1]: np.zeros(2)}
    opt2 = fastopt.Adam(fresh, lr=0.1)
    fastopt.load(tmp_path / "k.npz", params=fresh, optimizer=opt2)
    opt.step(grads())
    opt2.step(grads())
    for k in keys:
        np.testing.assert_array_equal(fresh[k], params[k])


def test_keys_stored_alike_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"params\[0\] and params\['0'\] have the same name"):
        fastopt.save(tmp_path / "c.npz", params={0: np.ones(1), "0": np.ones(1)})
    # a key stored like a layer's key over another array: one hid the other
    for clash in ({"1": {"x": np.ones(3)}, 1: np.ones(2)}, {1: np.ones(2), "1": {"x": np.ones(3)}}):
        with pytest.raises(ValueError, match="have the same name in a checkpoint"):
            fastopt.save(tmp_path / "c.npz", params=clash)
    assert not (tmp_path / "c.npz").exists()


def _state_by_name(opt, names):
    """Each param's part of every state buffer, as float values, by name
    (compact codes decoded)."""
    out = {}
    first = 0
    for group, st in zip(opt.param_groups, opt.state_dict()["state"]):
        sizes = [a.size for a in group["params"]]
        flat = st["buffers"]
        values = dict(opt._state_format.decoded(flat, sizes)) if opt._state_format.compact \
            else {}
        if "master" in flat or not opt._state_format.compact:
            values.update({k: v for k, v in flat.items() if k not in values
                           and not k.endswith("_absmax")})
        ends = np.cumsum([0] + sizes)
        for i in range(len(sizes)):
            out[names[first + i]] = {k: v[ends[i]:ends[i + 1]] for k, v in values.items()}
        first += len(sizes)
    return out


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_state_loads_into_the_same_names_in_another_order(tmp_path, backend,
                                                                    state_dtype):
    """A params dict built anew in another order (from a config, a sorted
    listing) takes its checkpoint: each param gets its own moments, and the
    run goes on as it would have, bit for bit with float state."""
    r = np.random.default_rng(0)
    shapes = {"W1": (300, 7), "b1": (7,), "W2": (7, 3), "b2": (3,), "g": ()}
    make = {k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    def groups(params):     # no decay on biases and gains, as people write it
        return [{"params": {k: v for k, v in params.items() if k.startswith("W")},
                 "weight_decay": 0.1},
                {"params": {k: v for k, v in params.items() if not k.startswith("W")},
                 "weight_decay": 0.0}]

    params = {k: v.copy() for k, v in make.items()}
    opt = fastopt.AdamW(groups(params), lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                        backend=backend)
    grads = [{k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(4)]
    for g in grads[:3]:
        opt.step(g)
    fastopt.save(tmp_path / "o.npz", params=params, optimizer=opt)
    order = ["b2", "g", "W2", "b1", "W1"]
    other = {k: np.zeros(shapes[k], np.float32) for k in order}
    opt2 = fastopt.AdamW(groups(other), lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                         backend=backend)
    fastopt.load(tmp_path / "o.npz", params=other, optimizer=opt2)
    names = [k for grp in groups(params) for k in grp["params"]]
    names2 = [k for grp in groups(other) for k in grp["params"]]
    before, after = _state_by_name(opt, names), _state_by_name(opt2, names2)
    for k in shapes:
        assert before[k].keys() == after[k].keys()
        for buf in before[k]:
            np.testing.assert_array_equal(after[k][buf], before[k][buf], err_msg=f"{k} {buf}")
    opt.step(grads[3])
    opt2.step(grads[3])
    for k in shapes:
        if state_dtype == "float32":
            np.testing.assert_array_equal(other[k], params[k], err_msg=k)
        else:       # the rounding draws follow each element's place in the buffer
            np.testing.assert_allclose(other[k], params[k], rtol=1e-5, atol=1e-6)


def test_renamed_params_are_refused_saying_which_name_differs():
    opt = fastopt.Adam({"W1": np.ones(3), "b1": np.ones(2)}, lr=0.1)
    opt.step({"W1": np.ones(3), "b1": np.ones(2)})
    sd = opt.state_dict()
    for params, said in (({"fc1.weight": np.ones(3), "fc1.bias": np.ones(2)},
                          "'W1' is in the checkpoint's group, not in this one"),
                         ({"W1": np.ones(3), "b1": np.ones(2), "c": np.ones(1)},
                          "'c' is in this group, not in the checkpoint's")):
        with pytest.raises(ValueError, match=f"names differ: {said}"):
            fastopt.Adam(params, lr=0.1).load_state_dict(sd)


def test_the_same_names_moved_between_groups_or_reshaped_are_refused(tmp_path):
    params = {"W": np.ones((3, 4)), "b": np.ones(4)}
    opt = fastopt.Adam([{"params": {"W": params["W"]}}, {"params": {"b": params["b"]}}],
                       lr=0.1)
    opt.step({"W": np.ones((3, 4)), "b": np.ones(4)})
    fastopt.save(tmp_path / "o.npz", params=params, optimizer=opt)
    other = {"b": np.zeros(4), "W": np.zeros((3, 4))}
    opt2 = fastopt.Adam([{"params": other}], lr=0.1)
    with pytest.raises(fastopt.CheckpointError, match="param groups"):
        fastopt.load(tmp_path / "o.npz", params=other, optimizer=opt2)
    # the same groups in another order: loaded by the names each holds
    opt3 = fastopt.Adam([{"params": {"b": other["b"]}, "lr": 0.5},
                         {"params": {"W": other["W"]}}], lr=0.1)
    with pytest.warns(UserWarning, match=r"param_groups\[0\] lr=0.1 replaces 0.5"):
        fastopt.load(tmp_path / "o.npz", optimizer=opt3)
    assert [g["lr"] for g in opt3.param_groups] == [0.1, 0.1]
    assert opt3.param_state(other["b"])["exp_avg"][0] == pytest.approx(0.1)
    # a name moved from one group to another: refused
    three = {"W": np.ones((3, 4)), "b": np.ones(4), "c": np.ones(2)}
    fastopt.save(tmp_path / "three.npz", optimizer=fastopt.Adam(
        [{"params": {"W": three["W"]}}, {"params": {"b": three["b"], "c": three["c"]}}]))
    moved = fastopt.Adam([{"params": {"W": three["W"], "b": three["b"]}},
                          {"params": {"c": three["c"]}}])
    with pytest.raises(fastopt.CheckpointError, match=r"\[W: float64\[3, 4\]\].*do not "
                                                      r"match this optimizer's \[W: "):
        fastopt.load(tmp_path / "three.npz", optimizer=moved)
    # one group, the names in another order, one of them another shape
    fastopt.save(tmp_path / "one.npz", params=params,
                 optimizer=fastopt.Adam(params, lr=0.1))
    reshaped = {"b": np.zeros(4), "W": np.zeros((4, 3))}
    with pytest.raises(fastopt.CheckpointError, match=r"W: float64\[4, 3\]"):
        fastopt.load(tmp_path / "one.npz", optimizer=fastopt.Adam(reshaped, lr=0.1))
    assert not other["W"].any() and not other["b"].any()

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scalar_param_and_a_scalar_extra_keep_their_shape(tmp_path, backend):
    """A 0-d param (a learnable temperature) and a 0-d array in ``extra``
    come back 0-d, and the checkpoint loads into the same model (a 0-d array
    was stored 1-d, and the load refused its own checkpoint)."""
    params = [np.ones((2, 2)), np.array(0.5)]
    opt = fastopt.AdamW(params, lr=0.1, backend=backend)
    opt.step([np.ones((2, 2)), np.array(1.0)])
    path = tmp_path / "scalar.npz"
    fastopt.save(path, params=params, optimizer=opt, extra={"best_loss": np.array(0.25)})
    back = fastopt.load(path)
    assert back["extra"]["best_loss"].shape == () and back["extra"]["best_loss"] == 0.25
    assert [a.shape for a in back["params"]] == [(2, 2), ()]
    into = [np.zeros((2, 2)), np.array(0.0)]
    opt2 = fastopt.AdamW(into, lr=0.1, backend=backend)
    fastopt.load(path, params=into, optimizer=opt2)
    np.testing.assert_array_equal(into[1], params[1])
    for o in (opt, opt2):
        o.step([np.ones((2, 2)), np.array(1.0)])
    np.testing.assert_array_equal(into[1], params[1])


def test_optimizer_state_saved_by_name_loads_into_one_made_from_a_list():
    """As fastopt.load reads params saved by name into a list (in the saved
    order), an optimizer made from a list takes the state of one made from
    a dict of the same arrays (it was refused, the names called a
    mismatch); a different layout is still named."""
    named = {"W": np.ones(3), "b": np.ones(2)}
    opt = fastopt.SGD(named, lr=0.1, momentum=0.9)
    opt.step({"W": np.full(3, 2.0), "b": np.ones(2)})
    listed = [np.ones(3), np.ones(2)]
    twin = fastopt.SGD(listed, lr=0.1, momentum=0.9)
    twin.load_state_dict(opt.state_dict())
    assert_same_tree(twin.state_dict()["state"], opt.state_dict()["state"])
    swapped = fastopt.SGD([np.ones(2), np.ones(3)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"params \[W: float64\[3\], b: float64\[2\]\] .* do not "
                                         r"match this optimizer's \[float64\[2\], float64\[3\]\]"):
        swapped.load_state_dict(opt.state_dict())


def test_a_ctrl_c_while_loading_loads_all_of_it(tmp_path, monkeypatch):
    """A Ctrl-C as the params were copied in left them half loaded and the
    optimizer not loaded at all: the load now completes, then the
    interrupt goes on. A ``~`` in the path is the home folder."""
    params = [np.full(3, 2.0), np.full(2, 3.0)]
    opt = fastopt.Adam(params, lr=0.1)
    opt.step([np.ones(3), np.ones(2)])
    monkeypatch.setenv("HOME", str(tmp_path))
    fastopt.save("~/ck.npz", params=params, optimizer=opt)
    assert (tmp_path / "ck.npz").is_file()
    fresh = [np.zeros(3), np.zeros(2)]
    opt2 = fastopt.Adam(fresh, lr=0.1)
    real = fastopt.checkpoint._prepare_params
    calls = []

    def interrupted_once(given, tree):
        apply = real(given, tree)

        def run():
            apply()
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt      # as the copy returns
        return run
    monkeypatch.setattr(fastopt.checkpoint, "_prepare_params", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        fastopt.load("~/ck.npz", params=fresh, optimizer=opt2)
    for a, b in zip(fresh, params):
        np.testing.assert_array_equal(a, b)
    assert opt2.state[0]["step"] == 1
    opt.step([np.ones(3), np.ones(2)])
    opt2.step([np.ones(3), np.ones(2)])
    for a, b in zip(fresh, params):
        np.testing.assert_array_equal(a, b)


def test_params_from_a_generator_or_dict_values(tmp_path):
    """torch users pass model.parameters(), a generator: it was refused."""
    ps = [np.ones(3), np.ones(2)]
    for given in ((p for p in ps), dict(a=ps[0], b=ps[1]).values()):
        opt = fastopt.Adam(given, lr=0.1)
        assert [a is b for a, b in zip(opt.param_groups[0]["params"], ps)] == [True, True]
    lbfgs = fastopt.LBFGS(p for p in ps)          # it looked at the generator twice
    assert len(lbfgs.param_groups[0]["params"]) == 2
    opt = fastopt.Adam([np.ones(1)], lr=0.1)
    opt.add_param_group({"params": (p for p in ps)})
    assert len(opt.param_groups[1]["params"]) == 2
    fastopt.save(tmp_path / "g.npz", params=(p for p in ps))
    fastopt.load(tmp_path / "g.npz", params=(p for p in ps))
    assert fastopt.global_norm({}) == fastopt.global_norm([]) == 0.0

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs symlinks and named pipes")
def test_save_writes_through_a_symlink_and_refuses_a_device(tmp_path):
    """The rename that makes a save atomic replaced a symlink itself
    (latest.npz -> ckpt_100.npz became a file, its target never updated),
    and a device or pipe at the path (/dev/null, as root) by a file."""
    p = [np.zeros(2)]
    fastopt.save(tmp_path / "ckpt_100.npz", params=p)
    os.symlink("ckpt_100.npz", tmp_path / "latest.npz")
    p[0][...] = 5.0
    fastopt.save(tmp_path / "latest.npz", params=p)
    assert os.path.islink(tmp_path / "latest.npz")
    np.testing.assert_array_equal(fastopt.checkpoint.read(tmp_path / "ckpt_100.npz")["params"][0],
                                  [5.0, 5.0])
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="exists and is not a regular file"):
        fastopt.save(tmp_path / "pipe", params=p)
    assert not os.path.isfile(tmp_path / "pipe")


def _quadratic(params, scale):
    """loss and grads (a dict like ``params``) of sum(scale_k * (p_k - 1)**2)"""
    loss = sum(float((scale[k] * (p - 1) ** 2).sum()) for k, p in params.items())
    return loss, {k: 2 * scale[k] * (p - 1) for k, p in params.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_lbfgs_and_sam_vectors_load_into_the_same_names_in_another_order(tmp_path, backend):
    """L-BFGS's history and SAM's perturbation are vectors over the params
    in order, beside the state buffers: moved with them, so the resumed run
    follows the uninterrupted one (to the order of the dot products' sums)."""
    r = np.random.default_rng(3)
    shapes = {"W": (40, 3), "b": (3,), "c": (7,)}
    scale = {k: r.uniform(0.5, 5, s) for k, s in shapes.items()}
    start = {k: r.standard_normal(s) for k, s in shapes.items()}
    order = ["c", "W", "b"]

    def fresh(keys):
        return {k: start[k].copy() for k in keys}

    # L-BFGS: save after 2 steps with a history, go on 2 more
    params = fresh(shapes)
    opt = fastopt.LBFGS(params, max_iter=2, history_size=3, backend=backend)
    for _ in range(2):
        opt.step(lambda: _quadratic(params, scale))
    fastopt.save(tmp_path / "l.npz", params=params, optimizer=opt)
    other = fresh(order)
    opt2 = fastopt.LBFGS(other, max_iter=2, history_size=3, backend=backend)
    fastopt.load(tmp_path / "l.npz", params=other, optimizer=opt2)
    for _ in range(2):
        opt.step(lambda: _quadratic(params, scale))
        opt2.step(lambda: _quadratic(other, scale))
    for k in shapes:
        np.testing.assert_allclose(other[k], params[k], rtol=1e-12, atol=1e-14, err_msg=k)

    # SAM: save between perturb and step (e held), then the step
    params = fresh(shapes)
    sam = fastopt.SAM(fastopt.SGD(params, lr=0.05, momentum=0.9, backend=backend), rho=0.5)
    for _ in range(2):
        sam.perturb(_quadratic(params, scale)[1])
        sam.step(_quadratic(params, scale)[1])
    sam.perturb(_quadratic(params, scale)[1])
    fastopt.save(tmp_path / "s.npz", params=params, optimizer=sam)
    other = fresh(order)
    sam2 = fastopt.SAM(fastopt.SGD(other, lr=0.05, momentum=0.9, backend=backend), rho=0.5)
    fastopt.load(tmp_path / "s.npz", params=other, optimizer=sam2)
    assert sam2.perturbed
    sam.step(_quadratic(params, scale)[1])
    sam2.step(_quadratic(other, scale)[1])
    for k in shapes:            # back to p from p + e, then the same SGD step
        np.testing.assert_allclose(other[k], params[k], rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("key,value,message", [
    ("lr", "1e-4", r"param_groups\[0\]\['lr'\] must be a real number"),
    ("lr", -1.0, r"param_groups\[0\]\['lr'\]"),
    ("betas", (0.9, 2.0), r"param_groups\[0\]\['betas'\]"),
    ("eps", None, r"param_groups\[0\]\['eps'\]")])
def test_a_value_a_step_refuses_is_refused_by_save_too(tmp_path, key, value, message):
    """An lr read from a YAML file as a string, set in a group, was saved
    (after the step refused it), and that checkpoint could never be loaded."""
    p = [np.ones(3)]
    opt = fastopt.Adam(p, lr=0.1)
    opt.step([np.ones(3)])
    opt.param_groups[0][key] = value
    path = tmp_path / "c.npz"
    with pytest.raises((TypeError, ValueError), match=message):
        fastopt.save(path, params=p, optimizer=opt)
    assert not path.exists()
    with pytest.raises((TypeError, ValueError), match=message):
        opt.state_dict()


def test_a_scheduled_group_is_saved_with_its_schedule_and_values_checked(tmp_path):
    p = [np.ones(3)]
    opt = fastopt.Adam(p, lr=S.warmup_cosine(0.1, 2, 10))
    opt.step([np.ones(3)])
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=opt)
    assert fastopt.load(tmp_path / "c.npz")["optimizer"]["param_groups"][0]["lr"] == \
        {"schedule": S.warmup_cosine(0.1, 2, 10).to_dict()}


def _gan(seed=0):
    """Two networks, one optimizer each, stepped in turn (a GAN's loop)."""
    rng = np.random.default_rng(seed)
    model = {"G": {"W": rng.standard_normal((3, 2))}, "D": {"W": rng.standard_normal((2, 3))}}
    opts = {"G": fastopt.Adam(model["G"], lr=1e-2, betas=(0.5, 0.999)),
            "D": fastopt.SGD(model["D"], lr=1e-2, momentum=0.9)}
    return model, opts


def _gan_steps(model, opts, start, n):
    for t in range(start, start + n):
        for k in ("D", "G"):
            opts[k].step({"W": np.sin(model[k]["W"] + t)})


@pytest.mark.parametrize("as_list", [False, True])
def test_several_optimizers_save_and_resume_together_bit_for_bit(tmp_path, as_list):
    model, opts = _gan()
    _gan_steps(model, opts, 0, 10)
    ref_model, ref_opts = _gan()
    _gan_steps(ref_model, ref_opts, 0, 15)
    given = [opts["G"], opts["D"]] if as_list else opts
    fastopt.save(tmp_path / "c.npz", params=model, optimizer=given, extra={"step": 10})
    model2, opts2 = _gan(seed=1)            # a new process: everything made again
    given2 = [opts2["G"], opts2["D"]] if as_list else opts2
    ckpt = fastopt.load(tmp_path / "c.npz", params=model2, optimizer=given2)
    assert ckpt["extra"]["step"] == 10
    _gan_steps(model2, opts2, 10, 5)
    for k in ("G", "D"):
        assert np.array_equal(model2[k]["W"], ref_model[k]["W"])


def test_several_optimizers_load_all_or_nothing(tmp_path):
    model, opts = _gan()
    _gan_steps(model, opts, 0, 3)
    fastopt.save(tmp_path / "c.npz", params=model, optimizer=opts)
    model2, opts2 = _gan(seed=1)
    _gan_steps(model2, opts2, 0, 1)
    opts2["D"] = fastopt.Adam(model2["D"], lr=1e-2)         # not the saved kind
    before = {k: model2[k]["W"].copy() for k in model2}
    g_state = opts2["G"].state_dict()
    with pytest.raises(fastopt.CheckpointError, match=r"optimizer\['D'\]"):
        fastopt.load(tmp_path / "c.npz", params=model2, optimizer=opts2)
    for k in model2:                            # nothing loaded: params, G's state
        assert np.array_equal(model2[k]["W"], before[k])
    assert opts2["G"].state_dict()["state"][0]["step"] == g_state["state"][0]["step"] == 1


def test_several_optimizers_are_matched_as_they_were_saved(tmp_path):
    model, opts = _gan()
    fastopt.save(tmp_path / "d.npz", params=model, optimizer=opts)
    fastopt.save(tmp_path / "l.npz", params=model, optimizer=[opts["G"], opts["D"]])
    fastopt.save(tmp_path / "one.npz", params=model, optimizer=opts["G"])
    with pytest.raises(fastopt.CheckpointError, match=r"holds optimizers by name \(\['D', 'G'\]\)"):
        fastopt.load(tmp_path / "d.npz", optimizer=[opts["G"], opts["D"]])
    with pytest.raises(fastopt.CheckpointError, match=r"holds the optimizers \['D', 'G'\], "
                                                      r"got \['G'\]"):
        fastopt.load(tmp_path / "d.npz", optimizer={"G": opts["G"]})
    with pytest.raises(fastopt.CheckpointError, match=r"holds 2 optimizers as a list"):
        fastopt.load(tmp_path / "l.npz", optimizer=opts)
    with pytest.raises(fastopt.CheckpointError, match=r"holds 2 optimizers' state, got 1"):
        fastopt.load(tmp_path / "l.npz", optimizer=[opts["G"]])
    with pytest.raises(fastopt.CheckpointError, match=r"one optimizer's state, not several"):
        fastopt.load(tmp_path / "one.npz", optimizer=[opts["G"]])
    with pytest.raises(fastopt.CheckpointError, match=r"holds no optimizer state of one "
                                                      r"optimizer: it holds 2"):
        fastopt.load(tmp_path / "l.npz", optimizer=opts["G"])


def test_several_optimizers_swapped_name_the_first_difference_and_warn_by_name(tmp_path):
    def net(out):
        return {f"{k}{i}": np.zeros(s) for i, (a, b) in enumerate([(2, 3), (3, 3), (3, out)])
                for k, s in (("W", (a, b)), ("b", (b,)))}
    G, D = net(2), net(1)
    opts = {"G": fastopt.Adam(G, lr=1e-3), "D": fastopt.Adam(D, lr=1e-3)}
    fastopt.save(tmp_path / "c.npz", params={"G": G, "D": D}, optimizer=opts)
    swapped = {"G": fastopt.Adam(D), "D": fastopt.Adam(G)}
    # (the lists shown stop at four entries, the same on both sides here)
    with pytest.raises(fastopt.CheckpointError, match=r"optimizer\['G'\]: .*\(first "
                       r"difference: 'W2' is float64\[3, 1\] here, float64\[3, 2\] in the "
                       r"checkpoint\)"):
        fastopt.load(tmp_path / "c.npz", optimizer=swapped)
    other_lr = {"G": fastopt.Adam(G, lr=5e-3), "D": fastopt.Adam(D, lr=5e-3)}
    with pytest.warns(UserWarning) as caught:
        fastopt.load(tmp_path / "c.npz", optimizer=other_lr)
    said = sorted(str(w.message)[:39] for w in caught)
    assert said == ["optimizer['D']: load_state_dict: the ch",
                    "optimizer['G']: load_state_dict: the ch"]
    assert other_lr["G"].param_groups[0]["lr"] == 1e-3


def test_warnings_as_errors_stop_a_load_of_several_only_once_all_is_loaded(tmp_path):
    """-W error: the first optimizer's 'lr replaces' warning, raised as its
    load was applied, stopped the load with the second one not loaded."""
    import warnings
    model, opts = _gan()
    _gan_steps(model, opts, 0, 3)
    fastopt.save(tmp_path / "c.npz", params=model, optimizer=opts)
    model2, _ = _gan(seed=1)
    opts2 = {"G": fastopt.Adam(model2["G"], lr=0.5, betas=(0.5, 0.999)),
             "D": fastopt.SGD(model2["D"], lr=0.5, momentum=0.9)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"optimizer\['G'\]: load_state_dict: .*lr=0.01 "
                                              r"replaces 0.5"):
            fastopt.load(tmp_path / "c.npz", params=model2, optimizer=opts2)
    assert [o.iterations for o in opts2.values()] == [3, 3]         # both loaded
    assert all(np.array_equal(model2[k]["W"], model[k]["W"]) for k in model)


def test_loads_of_several_optimizers_in_two_threads_leave_the_warnings_as_they_were(tmp_path):
    """Held through warnings.catch_warnings (process-wide state), two such
    loads at once left every later warning of the process swallowed."""
    import threading
    import warnings
    jobs = []
    for k in range(2):
        models = [{"W": np.ones(1000)} for _ in range(2)]
        opts = [fastopt.Adam(m, lr=0.1) for m in models]
        for o in opts:
            o.step({"W": np.ones(1000)})
        fastopt.save(tmp_path / f"c{k}.npz", optimizer=opts)
        jobs.append((tmp_path / f"c{k}.npz", opts))
    before = (list(warnings.filters), warnings._showwarnmsg_impl)
    errors = []

    def loads(path, opts):
        try:
            for _ in range(300):
                fastopt.load(path, optimizer=opts)
        except Exception as exc:        # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=loads, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (list(warnings.filters), warnings._showwarnmsg_impl) == before


def test_a_snapshot_of_the_weights_saves_beside_the_optimizer(tmp_path):
    """Copies of the trained weights (Keras's get_weights(), a best-so-far
    snapshot) are saved with the optimizer, and load into the arrays it
    trains."""
    W = np.ones(3, np.float32)
    opt = fastopt.Adam({"W": W}, lr=1e-3)
    opt.step({"W": np.ones(3, np.float32)})
    fastopt.save(tmp_path / "c.npz", params={"W": W.copy()}, optimizer=opt)
    opt.step({"W": np.ones(3, np.float32)})
    saved = fastopt.load(tmp_path / "c.npz", params={"W": W}, optimizer=opt)
    assert opt.iterations == 1 and np.array_equal(W, saved["params"]["W"])


def test_save_refuses_what_is_no_optimizer_naming_it(tmp_path):
    p = [np.ones(3)]
    opt = fastopt.Adam(p, lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer\[1\] must be an optimizer .*got dict"):
        fastopt.save(tmp_path / "c.npz", params=p, optimizer=[opt, opt.state_dict()])
    with pytest.raises(TypeError, match=r"keys, which must be strings: got 0"):
        fastopt.save(tmp_path / "c.npz", params=p, optimizer={0: opt})
    with pytest.raises(TypeError, match=r"or a list or dict of them, got set"):
        fastopt.save(tmp_path / "c.npz", params=p, optimizer={opt})
    with pytest.raises(ValueError, match=r"optimizer is an empty list"):
        fastopt.save(tmp_path / "c.npz", params=p, optimizer=[])
    assert not (tmp_path / "c.npz").exists()


def test_a_save_the_os_refuses_names_the_users_path(tmp_path, monkeypatch):
    """An OS error while writing named the hidden temporary file."""
    p = [np.ones(3)]
    real_open = os.open

    def read_only(path, *a, **k):
        if ".tmp-" in str(path):
            raise OSError(30, "Read-only file system", path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match=r"cannot save checkpoint: Read-only file system: "
                                      r"'[^']*c\.npz'$") as info:
        fastopt.save(tmp_path / "c.npz", params=p)
    assert info.value.errno == 30 and ".tmp-" not in str(info.value)


def test_a_load_lets_the_replaced_state_go(tmp_path):
    """The step plan kept the old state buffers alive after a load, until
    the next step: twice the optimizer state in memory meanwhile."""
    import gc
    import weakref
    p = [np.zeros(1000, np.float32)]
    opt = fastopt.AdamW(p, lr=1e-3)
    for _ in range(2):
        opt.step([np.ones(1000, np.float32)])
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=opt)
    old = weakref.ref(opt.state[0]["flat"]["exp_avg"])
    fastopt.load(tmp_path / "c.npz", params=p, optimizer=opt)
    gc.collect()
    assert old() is None
    opt.step([np.ones(1000, np.float32)])
    assert opt.state[0]["step"] == 3


def test_state_dtype_is_read_only():
    opt = fastopt.AdamW([np.ones(3, np.float32)], state_dtype="bfloat16")
    assert opt.state_dtype == "bfloat16"
    with pytest.raises(AttributeError, match=r"state_dtype is chosen when the optimizer is "
                                             r"made \(this one keeps its state as 'bfloat16'\)"):
        opt.state_dtype = "int8"


def test_a_loads_warning_names_the_callers_line(tmp_path):
    """Through fastopt.load the warning named a line inside fastopt."""
    p = [np.ones(3)]
    saved = fastopt.Adam(p, lr=0.1, max_grad_norm=1.0)
    fastopt.save(tmp_path / "c.npz", params=p, optimizer=saved)
    for load in (lambda o: fastopt.load(tmp_path / "c.npz", optimizer=o),
                 lambda o: o.load_state_dict(saved.state_dict())):
        with pytest.warns(UserWarning, match="max_grad_norm=1.0 replaces") as caught:
            load(fastopt.Adam([np.ones(3)], lr=0.1))
        assert caught[0].filename == __file__


def test_loading_other_group_values_says_which(tmp_path):
    """A fine-tune made with its own lr and given a pretraining run's state
    took the checkpoint's lr without a word (torch's load_state_dict does
    the same); said now, as the options are. Equal values and an equal
    schedule say nothing; a schedule on either side that differs is said
    (a resume given a new lr lost it unsaid where a schedule was involved)."""
    p = [np.ones(3)]
    pre = fastopt.AdamW(p, lr=1e-3)
    pre.step([np.ones(3)])
    tune = fastopt.AdamW([np.ones(3)], lr=1e-4, weight_decay=0.0)
    with pytest.warns(UserWarning, match=r"param_groups\[0\] lr=0\.001 replaces 0\.0001; "
                                         r"param_groups\[0\] weight_decay=0\.01 replaces 0\.0"):
        tune.load_state_dict(pre.state_dict())
    assert tune.param_groups[0]["lr"] == 1e-3
    sched = fastopt.schedules.linear(1e-3, 0.0, 10)
    a = fastopt.AdamW([np.ones(3)], lr=sched)
    a.step([np.ones(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastopt.AdamW([np.ones(3)], lr=1e-3).load_state_dict(pre.state_dict())
        fastopt.AdamW([np.ones(3)], lr=sched).load_state_dict(a.state_dict())
    with pytest.warns(UserWarning, match=r"param_groups\[0\] lr schedule linear\(.*\) "
                                         r"replaces 0\.0007"):
        fastopt.AdamW([np.ones(3)], lr=7e-4).load_state_dict(a.state_dict())
    with pytest.warns(UserWarning, match=r"param_groups\[0\] lr 0\.001 replaces schedule "
                                         r"linear\("):
        fastopt.AdamW([np.ones(3)], lr=sched, weight_decay=0.01).load_state_dict(
            pre.state_dict())
    with pytest.warns(UserWarning, match=r"lr schedule linear\(init_value=0\.001.*replaces "
                                         r"schedule linear\(init_value=0\.002"):
        fastopt.AdamW([np.ones(3)], lr=fastopt.schedules.linear(2e-3, 0.0, 10)
                      ).load_state_dict(a.state_dict())
