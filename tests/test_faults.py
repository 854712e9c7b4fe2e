"""Fault injection: the mistakes users and operators make, and what the run must do about them.

Each test reproduces one observation of issue 17 (numbered O1-O11 below) and checks the
guarantee the README's "When things go wrong" section states. The end-to-end tests share one
30-step run (`base`), copied per test, and compare against its checkpoints bitwise.
"""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unicodedata

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli import ROOT, SENTENCES, one_error_line, start, train_args, train_env, wait_for

from bert_jax import axes, checkpoint, cli, files, models, optim, run_files, sharding, training
from bert_jax.data import tokenization

STEPS = 30


def _corpus(tmp_path):
    """The tests' corpus, with one line of invalid UTF-8 in it (O5)."""
    docs = [
        "\n".join(f"{s[:-1]} in story {i}." for s in SENTENCES[i % 7 :] + SENTENCES[: i % 7])
        for i in range(40)
    ]
    path = tmp_path / "corpus.txt"
    text = ("\n\n".join(docs) + "\n").encode("utf-8")
    path.write_bytes(text.replace(b"in story 3.", b"in story \xff3.", 1))
    return path


def _args(tmp_path, workdir, steps, *extra, own_cache=False):
    args = train_args(tmp_path, workdir, steps, *extra, own_cache=own_cache)
    corpus = _corpus(tmp_path)
    return [
        f"--config.data.corpus={corpus}" if a.startswith("--config.data.corpus=") else a
        for a in args
    ]


def _train(tmp_path, workdir, steps=STEPS, *extra, check=True, own_cache=False):
    proc = subprocess.run(
        _args(tmp_path, workdir, steps, *extra, own_cache=own_cache),
        capture_output=True,
        text=True,
        env=train_env(1),
        timeout=600,
        cwd=tmp_path,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start(tmp_path, workdir, steps=STEPS, *extra, own_cache=False):
    return start(_args(tmp_path, workdir, steps, *extra, own_cache=own_cache), cwd=tmp_path)


def _snapshot(workdir):
    """Every file of a workdir: relative path -> sha256 of its bytes."""
    out = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, workdir)] = hashlib.sha256(
                open(path, "rb").read()
            ).hexdigest()
    return out


def _params(workdir, step):
    with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",)) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.device_get(state["state"])


def _assert_bitwise(workdir, other, step=STEPS):
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, step), _params(other, step))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 30-step run (checkpoints 10, 20, 30) on the corpus with a bad byte."""
    tmp = tmp_path_factory.mktemp("faults")
    proc = _train(tmp, tmp / "base")
    return tmp, tmp / "base", proc


def _copy(base, name, drop=(STEPS,)):
    """A copy of the base workdir with its newest checkpoint(s) removed: a run to resume."""
    tmp, workdir, _ = base
    copy = tmp / name
    shutil.copytree(workdir, copy)
    for step in drop:
        shutil.rmtree(copy / "checkpoints" / str(step))
    return copy


@pytest.mark.slow
def test_o5_invalid_utf8_is_replaced_counted_and_named_while_learning_the_vocabulary(base):
    _, workdir, proc = base
    out = proc.stdout + proc.stderr
    assert "while learning the vocabulary: " in out
    assert f"{base[0] / 'corpus.txt'}: 1 line(s) with invalid UTF-8" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20", "30"]


@pytest.mark.slow
def test_o1_o2_changed_optimizer_is_refused_untouched_and_the_original_resumes(base):
    tmp, done, _ = base
    workdir = _copy(base, "changed_optim")
    before = _snapshot(workdir)
    other = _train(tmp, workdir, STEPS, "--config.optim.name=lamb", check=False)
    assert other.returncode == 2
    line = one_error_line(other.stderr)
    assert "optim.name: 'adamw' there, 'lamb' here" in line and "new --workdir" in line
    assert _snapshot(workdir) == before  # same names, same bytes: nothing renamed or rewritten
    bigger = _train(tmp, workdir, STEPS, "--config.model.num_hidden_layers=3", check=False)
    assert bigger.returncode == 2 and "model.num_hidden_layers: 2 there, 3 here" in bigger.stderr
    assert _snapshot(workdir) == before  # config.json and vocab.txt too (O2)
    resumed = _train(tmp, workdir)
    assert "resumed from step 20" in resumed.stdout
    _assert_bitwise(workdir, done)


@pytest.mark.slow
def test_o2_export_refuses_a_workdir_whose_config_was_replaced(base):
    workdir = _copy(base, "replaced_config", drop=())
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["num_hidden_layers"] = 1  # what a refused run of the old code wrote
    (workdir / "config.json").write_text(json.dumps(config))
    out = base[0] / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "bert_jax.convert", "export-hf", str(workdir), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "num_hidden_layers: 2 in the checkpoint, 1 in config.json" in one_error_line(proc.stderr)
    assert not out.exists()


@pytest.mark.slow
def test_o3_a_second_run_on_a_workdir_is_refused_and_the_first_is_unaffected(base):
    tmp, done, _ = base
    workdir = _copy(base, "concurrent", drop=(20, 30))
    first = _start(tmp, workdir)
    wait_for(workdir / ".lock", first)
    second = _train(tmp, workdir, check=False)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    line = one_error_line(second.stderr)
    assert "is in use by another run" in line and f"PID {first.pid}" in line
    assert "resumed from step 10" in out and not (workdir / ".lock").exists()
    _assert_bitwise(workdir, done)


def test_o3_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    workdir = tmp_path / "w"
    with run_files.WorkdirLock(str(workdir), "first"):
        with pytest.raises(run_files.WorkdirInUseError, match=f"PID {os.getpid()}"):
            run_files.WorkdirLock(str(workdir), "second")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / ".lock").write_text(
        json.dumps(dict(host=socket.gethostname(), pid=dead.pid, started=0.0, command="x"))
    )
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        run_files.WorkdirLock(str(workdir), "third").release()
    # Another host's lock is stale once nobody touched it for the heartbeat timeout.
    (workdir / ".lock").write_text(
        json.dumps(dict(host="elsewhere", pid=1, started=0.0, command="x"))
    )
    with pytest.raises(run_files.WorkdirInUseError, match="on elsewhere"):
        run_files.WorkdirLock(str(workdir), "fourth")
    os.utime(workdir / ".lock", (0, 0))
    with pytest.warns(UserWarning, match="stale"):
        run_files.WorkdirLock(str(workdir), "fifth").release()
    assert not (workdir / ".lock").exists()


@pytest.mark.slow
def test_o4_flipped_bytes_are_detected_and_the_run_falls_back(base):
    tmp, done, _ = base
    workdir = _copy(base, "flipped", drop=())
    shutil.rmtree(workdir / "checkpoints" / "30")
    newest = workdir / "checkpoints" / "20" / "state"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 16] = os.urandom(16)
    biggest.write_bytes(bytes(data))
    resumed = _train(tmp, workdir)
    assert "checkpoints/20 is damaged: 1 file(s) fail their checksums" in resumed.stderr
    assert "resumed from step 10" in resumed.stdout
    assert any(n.startswith("20.damaged-") for n in os.listdir(workdir / "checkpoints"))
    _assert_bitwise(workdir, done)


@pytest.mark.slow
def test_o1_every_checkpoint_damaged_is_not_silently_restarted(base):
    tmp, _, _ = base
    workdir = _copy(base, "all_damaged", drop=())
    for step in (10, 20, 30):
        (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_bytes(b"\x00garbage")
    refused = _train(tmp, workdir, check=False)
    assert refused.returncode == 1
    line = one_error_line(refused.stderr)
    assert "every checkpoint in" in line and "--config.train.start_over=true" in line
    again = _train(tmp, workdir, check=False)  # the damaged ones stay aside: still refused
    assert again.returncode == 1 and "every checkpoint in" in again.stderr
    fresh = _train(tmp, workdir, 10, "--config.train.start_over=true")
    assert "resumed" not in fresh.stdout
    assert sorted(n for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == ["10"]


CONFIG = models.BertConfig.named("L-2_H-128", vocab_size=256, max_position_embeddings=32)


def _trainer(mesh_config=None, name="adamw"):
    mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
    config = optim.OptimConfig(name=name, warmup_steps=1, total_steps=10)
    return training.create_trainer(CONFIG, config, mesh, axes.DEFAULT_RULES), mesh


def _batch():
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(5, 256, (8, 16)).astype(np.int32),
        "input_mask": np.ones((8, 16), np.int32),
        "segment_ids": np.zeros((8, 16), np.int32),
        "masked_lm_positions": np.tile(np.arange(1, 4, dtype=np.int32), (8, 1)),
        "masked_lm_ids": rng.integers(5, 256, (8, 3)).astype(np.int32),
        "masked_lm_weights": np.ones((8, 3), np.float32),
        "next_sentence_labels": np.zeros(8, np.int32),
    }


def test_o4_any_flipped_byte_of_any_checkpoint_file_fails_its_checksum(tmp_path):
    trainer, mesh = _trainer(sharding.MeshConfig(2, 2, 2))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with jax.set_mesh(mesh):
        ckpt.save(1, trainer.init(0), {"epoch": 0}, {"note": "x"})
    ckpt.close()
    step_dir = str(tmp_path / "ckpt" / "1")
    assert checkpoint.verify_checksums(step_dir) == []
    files_ = [f for f in checkpoint._step_files(step_dir)]
    assert any("ocdbt.process_0/d/" in f for f in files_)
    for relpath in files_:
        path = os.path.join(step_dir, relpath)
        original = open(path, "rb").read()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        open(path, "wb").write(bytes(flipped))
        assert checkpoint.verify_checksums(step_dir) == [f"{relpath} differs from its checksum"]
        open(path, "wb").write(original)


def test_o4_non_finite_restored_state_is_damage_and_never_reaches_the_parameters(tmp_path):
    trainer, mesh = _trainer()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with jax.set_mesh(mesh):
        good = trainer.init(0)
        ckpt.save(1, good, {"i": 1}, {})
        ckpt.wait()
        # A NaN in the first Adam moment: what random bytes in the array data restore to.
        mu = good.opt_state[1][0].mu
        poisoned_mu = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), mu)
        poisoned = good.replace(
            opt_state=(
                good.opt_state[0],
                (good.opt_state[1][0]._replace(mu=poisoned_mu), *good.opt_state[1][1:]),
                *good.opt_state[2:],
            )
        )
        ckpt.save(2, poisoned, {"i": 2}, {})
        ckpt.wait()
        before = jax.device_get(poisoned.params)
        state, metrics = trainer.train_step(
            poisoned, sharding.global_batch(_batch(), mesh, axes.DEFAULT_RULES)
        )
        # The loss and gradient are finite; the update is not: the guard keeps the params.
        assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
        with pytest.warns(UserWarning, match="holds non-finite values in opt_state"):
            step, _, data, _ = ckpt.restore_latest(trainer.abstract_state)
    ckpt.close()
    assert (step, data) == (1, {"i": 1})


def test_o1_another_optimizer_state_is_incompatible_not_damaged(tmp_path):
    trainer, mesh = _trainer()
    lamb, _ = _trainer(name="lamb")
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    with jax.set_mesh(mesh):
        ckpt.save(1, trainer.init(0), {}, {})
        ckpt.wait()
        with pytest.raises(checkpoint.IncompatibleCheckpoint, match="another train state"):
            ckpt.restore_latest(lamb.abstract_state)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]


def _mount_tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode:
        pytest.skip(f"a small file system is needed to fill (mount tmpfs: {proc.stderr!r})")


def test_o7_a_save_that_fills_the_disk_gives_one_message_and_keeps_the_others(
    tmp_path, monkeypatch
):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "24m")
    try:
        trainer, mesh = _trainer()
        ckpt = checkpoint.Checkpointer(str(disk / "ckpt"))
        with jax.set_mesh(mesh):
            state = trainer.init(0)
            ckpt.save(1, state, {}, {})
            ckpt.wait()
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - 2**19))
            # The space check passes (it is told the disk is empty): the write itself fails.
            monkeypatch.setattr(files, "require_free", lambda *a: None)
            ckpt.save(2, state, {}, {})
            with pytest.raises(files.DiskFullError) as raised:
                ckpt.wait()
        message = cli.message(raised.value)
        assert "checkpoint of step 2 could not be written" in message and "disk is full" in message
        assert "MiB free" in message and cli.exit_status(raised.value) == 1
        assert sorted(os.listdir(disk / "ckpt")) == ["1"]  # the half-written save is gone
        assert checkpoint.verify_checksums(str(disk / "ckpt" / "1")) == []
        ckpt.close()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(path, leave: int) -> None:
    """Writes zeros to `path` until `leave` bytes are free on its disk, or the disk is full:
    the run writes its next checkpoint meanwhile, so the space measured before writing may
    be gone by the end of it (one large write then failed with ENOSPC, in the test itself)."""
    chunk = b"\0" * 2**20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while (free := shutil.disk_usage(path.parent).free) > leave:
            try:
                os.write(fd, chunk[: free - leave])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)


@pytest.mark.slow
def test_o7_a_disk_filled_during_the_run_stops_it_at_that_save_and_the_rerun_resumes(base):
    tmp, done, _ = base
    disk = tmp / "small_disk"
    _mount_tmpfs(disk, "64m")
    try:
        workdir = disk / "w"
        run = _start(tmp, workdir)
        wait_for(workdir / "checkpoints" / "10" / "checksums" / "process_0.json", run)
        _fill(disk / "filler", leave=2**20)  # someone else fills the disk
        out, err = run.communicate(timeout=600)
        assert run.returncode == 1
        line = one_error_line(err)
        # The save after the filler is refused by its free-space check, or, when the disk
        # filled while it was being written, fails in the background: one line either way,
        # naming the step, the folder and the space.
        assert "free but the checkpoint of step" in line or (
            "could not be written" in line and "the disk is full" in line
        )
        assert str(disk) in line and "MiB" in line
        assert os.listdir(workdir / "checkpoints")  # what was saved before stays
        (disk / "filler").unlink()
        resumed = _train(tmp, workdir)
        assert "resumed from step" in resumed.stdout
        _assert_bitwise(workdir, done)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_o6_config_and_path_problems_are_all_reported_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in [*tokenization.SPECIAL_TOKENS, "a", "b", "a"]))
    proc = _train(
        tmp_path,
        blocker / "w",
        5,
        "--config.data.max_seq_length=600",
        f"--config.data.vocab_file={vocab}",
        "--config.train.batch_size=15",
        "--config.optim.grad_accum_steps=2",
        check=False,
        own_cache=True,
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert "4 problem(s) before anything was started" in err, err[-3000:]
    assert "cannot write the run's files" in err
    assert "max_seq_length=600 exceeds model.max_position_embeddings=512" in err
    assert "lists 1 token(s) more than once ('a' on lines 6 and 8)" in err
    assert "train.batch_size=15 is not divisible" in err
    assert not (tmp_path / "cache").exists()  # nothing learned, nothing preprocessed


@pytest.mark.slow
def test_o11_sigterm_during_start_up_says_so(tmp_path):
    proc = _start(tmp_path, tmp_path / "w", 5, own_cache=True)
    wait_for(tmp_path / "cache", proc)  # preprocessing has begun; compiling is still ahead
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM during start-up" in err


def test_a_start_up_sigterm_that_a_library_swallowed_still_stops_the_run(monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_in_main", True)
    monkeypatch.setattr(cli, "_terminated", False)
    try:
        cli.stop_on_sigterm()
        try:  # as a `__del__` or a library's `except BaseException` would
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler runs at the next bytecode; this bounds the wait
        except cli.Terminated:
            pass
        with pytest.raises(cli.Terminated):
            cli.take_over_sigterm(lambda signum, frame: None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_start_up_sigterm_that_a_library_turned_into_another_error_still_exits_143(
    monkeypatch, capsys
):
    def main(argv):
        del argv
        try:
            raise cli.Terminated()  # as the handler does, inside a library's call
        except BaseException as e:  # the library wraps what it caught
            raise RuntimeError("worker pool broke") from e

    monkeypatch.setattr(cli, "_terminated", True)  # the handler ran
    with pytest.raises(SystemExit) as stop:
        cli.run(main, [])
    assert stop.value.code == 128 + signal.SIGTERM
    assert one_error_line(capsys.readouterr().err) == (
        "error: stopped by SIGTERM during start-up, before training began; nothing was lost "
        "(while it stopped: worker pool broke)"
    )
    monkeypatch.setattr(cli, "_terminated", False)  # without a SIGTERM the error is the error
    with pytest.raises(SystemExit) as stop:
        cli.run(main, [])
    assert stop.value.code == 1


def test_o9_words_get_their_own_pieces_around_every_separator_the_tokenizer_deletes(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    pieces = [*tokenization.SPECIAL_TOKENS, "page", "next", "ne", "##ne", "##xt", "##ge", "pa"]
    vocab.write_text("".join(t + "\n" for t in pieces))
    ours = tokenization.WordPieceTokenizer(vocab)
    ref = BertTokenizerLegacy(str(vocab), do_lower_case=True)
    separators = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", " \t "]
    texts = [f"page{sep}next" for sep in separators]
    # The reference: each str.split word tokenized alone by the original BERT rules.
    expected = [
        [ref.convert_tokens_to_ids(ref.tokenize(w)) for w in text.split()] for text in texts
    ]
    assert all(len(e) == 2 for e in expected)
    assert ours.encode_words(texts) == expected


def test_o6_a_vocabulary_with_duplicate_tokens_is_refused_at_load(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in [*tokenization.SPECIAL_TOKENS, "x", "[CLS]"]))
    with pytest.raises(ValueError, match=r"'\[CLS\]' on lines 3 and 7"):
        tokenization.WordPieceTokenizer(vocab)


def _albert_reference(sp, text, lower, keep_accents):
    """google-research/albert `tokenization.py` (`preprocess_text`, `encode_pieces`) with
    Hugging Face's `keep_accents` switch, written out as the reference."""
    out = " ".join(text.strip().split()).replace("``", '"').replace("''", '"')
    if not keep_accents:
        out = unicodedata.normalize("NFKD", out)
        out = "".join(c for c in out if not unicodedata.combining(c))
    if lower:
        out = out.lower()
    pieces = []
    for piece in sp.encode(out, out_type=str):
        if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
            cur = sp.encode(piece[:-1].replace("\u2581", ""), out_type=str)
            if piece[0] != "\u2581" and cur[0][0] == "\u2581":
                cur = cur[1:] if len(cur[0]) == 1 else [cur[0][1:], *cur[1:]]
            pieces.extend([*cur, piece[-1]])
        else:
            pieces.append(piece)
    return [sp.piece_to_id(p) for p in pieces]


@pytest.mark.parametrize("lower,keep_accents", [(True, False), (False, False), (False, True)])
def test_o10_sentencepiece_follows_albert_preprocessing(tmp_path, lower, keep_accents):
    import sentencepiece as spm

    texts = [
        "In 1990, 2000, and 2010, the café sold 3,500 crêpes.",
        "Noël à Zürich: façade, naïve, résumé 42,",
        "ガギグゲゴ ぱぴぷ の カフェ 1,2,3, 東京 2020,",
    ]
    prefix = tmp_path / "wild"
    spm.SentencePieceTrainer.train(  # a model from the wild: no [CLS]/[SEP]/[MASK] pieces
        sentence_iterator=iter(texts * 50),
        model_prefix=str(prefix),
        vocab_size=120,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    assert any(
        p[-1] == "," and p[-2].isdigit()
        for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
        if len(p) > 1
    ), "the test model must hold digit-comma pieces for the rule to matter"
    tok = tokenization.SentencePieceTokenizer(
        f"{prefix}.model", do_lower_case=lower, keep_accents=keep_accents
    )
    for text in texts:
        assert tok.encode(text) == _albert_reference(sp, text, lower, keep_accents), text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tokenization.albert_preprocess("ガ café", False) == "カ cafe"


def _tiny_hf(tmp_path, layers=2):
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(config)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    words = [f"w{i}" for i in range(64 - len(tokenization.SPECIAL_TOKENS))]
    (out / "vocab.txt").write_text(
        "".join(t + "\n" for t in [*tokenization.SPECIAL_TOKENS, *words])
    )
    return out


@pytest.mark.parametrize("says", [4, 1])
def test_o8_import_with_a_config_of_another_depth_exits_non_zero(tmp_path, says):
    source = _tiny_hf(tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = says
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "imported"
    proc = subprocess.run(
        [sys.executable, "-m", "bert_jax.convert", "import-hf", str(source), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=train_env(1),
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"num_hidden_layers={says} but" in line and "holds 2 layers" in line
    assert not (out / "checkpoints").exists()


def test_o11_model_folders_are_recognised_without_a_prefix(tmp_path):
    from bert_jax import convert

    source = _tiny_hf(tmp_path)
    assert convert.model_kind(str(source)) == ("hf", str(source))
    tf_dir = os.path.join(ROOT, "tests", "data", "tf_bert")
    assert convert.model_kind(tf_dir) == ("tf", tf_dir)
    with pytest.raises(ValueError, match=f"pass hf:{source}"):
        convert.model_kind(f"tf:{source}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is none of a Hugging Face model directory"):
        convert.model_kind(str(tmp_path / "empty"))


def test_o11_written_files_follow_the_umask(tmp_path):
    from bert_jax import convert

    source = _tiny_hf(tmp_path)
    mask = os.umask(0o022)
    try:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
        loaded = convert.load_pretrained(str(source), "BertForPreTraining", mesh=mesh)
        out = tmp_path / "exported"
        convert.export_hf(jax.device_get(loaded.params), loaded.config, loaded.tokenizer, str(out))
        files.atomic_write(str(tmp_path / "config.json"), b"{}")
    finally:
        os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert os.stat(out / "config.json").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o644


def test_o6_finetune_data_is_checked_whole_before_compiling(tmp_path):
    sys.path.insert(0, ROOT)
    import glue_data

    import finetune
    from bert_jax.tasks import registry

    glue_data.write_glue(tmp_path / "glue", n=6)
    (tmp_path / "glue/SST-2/test.tsv").unlink()  # a user's own data: train and dev only
    dev = tmp_path / "glue/RTE/dev.tsv"
    dev.write_text(dev.read_text().splitlines()[0] + "\n")  # a header and no examples
    (tmp_path / "glue/CoLA/dev.tsv").write_text("")
    cfg = glue_data.finetune_config(tasks=("sst2", "rte", "cola"), data_dir=str(tmp_path / "glue"))
    with pytest.raises(ValueError, match="2 problem") as raised:
        finetune.check_data(cfg)
    assert "RTE/dev.tsv has a header but no examples" in str(raised.value)
    assert "CoLA/dev.tsv is empty" in str(raised.value)
    finetune.check_data(dataclasses.replace(cfg, tasks=("sst2",)))
    assert registry.get_task("sst2").test_splits(cfg.settings()) == []


def test_cli_errors_are_one_line_with_an_exit_status(capsys):
    assert cli.report(ValueError("bad value; use another"), verbose=False) == 2
    assert capsys.readouterr().err.strip().startswith("error: bad value; use another")
    assert cli.report(RuntimeError("diverged"), verbose=False) == 1
    assert cli.report(files.DiskFullError(28, "full"), verbose=False) == 1
    assert cli.report(FileNotFoundError("no such"), verbose=False) == 2
    capsys.readouterr()
    try:
        raise KeyError("model")
    except KeyError as e:
        assert cli.report(e, verbose=True) == 2
    assert "Traceback" in capsys.readouterr().err
