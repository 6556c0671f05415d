"""The stdlib corpus, the byte tokenizer, Megatron's GPT datasets over them, dp sharding."""

import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch

from zeromega.integrations.megatron import data as D

SMALL = 200_000
SPLIT = "8,1,1"  # a 200 KB corpus has too few documents for 98,1,1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return D.build_corpus(tmp_path_factory.mktemp("corpus") / "c", max_bytes=SMALL)


@pytest.fixture(scope="module")
def splits(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return D.build_gpt_datasets(corpus, seq_length=64, seed=5, num_samples=(200, 10, 10),
                                split=SPLIT, cache_dir=cache)


def _read(prefix, suffix):
    return open(f"{prefix}{suffix}", "rb").read()


def test_corpus_is_deterministic_and_matches_sources(corpus, tmp_path):
    again = D.build_corpus(tmp_path / "other", max_bytes=SMALL)
    assert _read(corpus, ".bin") == _read(again, ".bin")
    assert _read(corpus, ".idx") == _read(again, ".idx")
    ids = np.frombuffer(_read(corpus, ".bin"), dtype=np.uint16)
    assert ids.size == SMALL + (ids == D.EOD).sum()  # all the text, plus one EOD per document
    docs = np.split(ids, np.flatnonzero(ids == D.EOD) + 1)[:-1]
    assert len(docs) >= 10
    first = D._stdlib_sources()[0].read_bytes()
    assert docs[0][:-1].astype(np.uint8).tobytes() == first and docs[0][-1] == D.EOD
    assert not any(p in ("test", "site-packages") for s in D._stdlib_sources() for p in s.parts)


def test_corpus_skips_when_built_and_rebuilds_on_other_size(tmp_path):
    prefix = D.build_corpus(tmp_path / "c", max_bytes=50_000)
    stamp = os.stat(f"{prefix}.bin").st_mtime_ns
    assert D.build_corpus(prefix, max_bytes=50_000) == prefix
    assert os.stat(f"{prefix}.bin").st_mtime_ns == stamp
    D.build_corpus(prefix, max_bytes=60_000)
    assert np.fromfile(f"{prefix}.bin", dtype=np.uint16).size > 60_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx", "c.json"]


def test_default_prefix_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROMEGA_DATA", str(tmp_path))
    assert D.default_corpus_prefix().parent == tmp_path
    assert D.default_corpus_prefix().name.startswith("stdlib-py")


def test_tokenizer_round_trip():
    tok = D.ByteTokenizer()
    text = "def f(x):\n    return 'héllo → wörld' 🐍\n"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod]) == text
    assert tok.detokenize([0xFF, ord("a")]) == "\ufffda"
    assert (tok.vocab_size, tok.eod, len(tok.vocab)) == (257, 256, 257)
    assert tok.pad not in range(tok.vocab_size)


def test_samples_are_shifted_windows(splits):
    train, valid, test = splits
    assert len(train) >= 200 and len(valid) >= 10 and len(test) >= 10
    for i in range(0, 50, 7):
        s = train[i]
        assert s["tokens"].shape == (64,) and s["labels"].shape == (64,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(64))
        assert bool((s["loss_mask"] == 1).all())
        assert int(s["tokens"].max()) <= D.EOD and int(s["tokens"].min()) >= 0
    assert not torch.equal(train[0]["tokens"], train[1]["tokens"])


def test_datasets_depend_on_seed_only(corpus, tmp_path):
    kw = dict(seq_length=64, num_samples=(200, 10, 10), split=SPLIT, cache_dir=tmp_path)
    a = D.build_gpt_datasets(corpus, seed=5, **kw)[0]
    b = D.build_gpt_datasets(corpus, seed=5, **kw)[0]
    c = D.build_gpt_datasets(corpus, seed=6, **kw)[0]
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(20))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(20))


def test_empty_split_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="no document"):
        D.build_gpt_datasets(corpus, 64, 5, (10, 10, 10), split="998,1,1", cache_dir=tmp_path)


@pytest.mark.parametrize("start", [0, 12])
def test_dp_shards_concatenate_to_the_dp1_batch(splits, start):
    train = splits[0]
    whole = D.sample_batches(train, 4, start_sample=start)
    for dp, m in ((2, 2), (4, 1)):
        ranks = [D.sample_batches(train, m, start, r, dp) for r in range(dp)]
        for _ in range(5):
            ref = next(whole)
            parts = [next(it) for it in ranks]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(torch.cat([p[key] for p in parts]), ref[key])
            assert parts[0]["tokens"].shape == (m, 64)
        whole = D.sample_batches(train, 4, start_sample=start)
    first = next(D.sample_batches(train, 2, start, 0, 1))["tokens"]
    assert torch.equal(first[0], train[start]["tokens"])


def test_dp_sharding_drops_the_partial_tail(splits):
    valid = splits[1]
    got = list(D.sample_batches(valid, 3, 0, 1, 2))
    assert len(got) == len(valid) // 6
    with pytest.raises(ValueError):
        next(D.sample_batches(valid, 1, 0, 2, 2))


def _dist_worker(rank, port, prefix, cache, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    train = D.build_gpt_datasets(prefix, 64, 9, (100, 5, 5), split=SPLIT, cache_dir=cache)[0]
    # As a list: a tensor would travel as shared memory that dies with this process.
    queue.put((rank, next(D.sample_batches(train, 2, 0, rank, 2))["tokens"].tolist()))
    dist.barrier()
    dist.destroy_process_group()


def test_gloo_job_builds_on_rank0_and_matches_single_process(corpus, tmp_path):
    """Forked (megatron is already imported, so this is quick); a hang fails on the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, port, corpus, tmp_path, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    # Not initialized here: this loads the index cache rank 0 wrote.
    train = D.build_gpt_datasets(corpus, 64, 9, (100, 5, 5), split=SPLIT, cache_dir=tmp_path)[0]
    assert got[0] + got[1] == next(D.sample_batches(train, 4))["tokens"].tolist()


# ------------------------------------------------------------------ blends, small corpora, mock data (issue 15)


def _documents(prefix, count: int, length: int = 300, first: int = 0):
    """``count`` byte-tokenized documents of ``length`` ids (+ EOD) with a per-document fill value."""
    builder = D.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(count):
        ids = np.full(length + 1, (first + i) % 256, dtype=np.uint16)
        ids[-1] = D.EOD
        builder.add_document(ids, [ids.size])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def one_rank():
    """A one-rank gloo group (Megatron-Core's BlendedDataset asks for the rank), gone after the test."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_weighted_blend_draws_megatrons_proportions(tmp_path, one_rank):
    """--data-path 0.3 A 0.7 B: Megatron-Core's BlendedDataset takes 30% / 70% of the samples from A / B."""
    a, b = _documents(tmp_path / "a", 20, first=0), _documents(tmp_path / "b", 20, first=100)
    train, valid, test = D.build_datasets(64, 5, (1000, 0, 0), blend=([a, b], [0.3, 0.7]), split="1,0,0",
                                          cache_dir=tmp_path / "cache")
    assert valid is None and test is None and len(train) == 1000
    counts = np.bincount([int(train[i]["dataset_id"]) for i in range(len(train))], minlength=2)
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 700) <= 1
    for i in range(0, 1000, 97):  # each sample holds its own dataset's documents
        values = set(train[i]["tokens"].tolist()) - {D.EOD}
        assert values <= (set(range(20)) if int(train[i]["dataset_id"]) == 0 else set(range(100, 120)))
    batch = next(D.sample_batches(train, 4))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}


def test_the_flags_blend_and_per_split_paths(tmp_path):
    from zeromega.config import ConfigError
    from zeromega.launch import script_args, translate
    from zeromega.run import gpt

    a, b = _documents(tmp_path / "a", 4), _documents(tmp_path / "b", 4, first=50)
    base = ["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "1", "--seq-length", "16", "--lr", "1"]
    cfg = script_args.read([*base, "--data-path", "3", a, "1", b], "pretrain_gpt.py")
    assert gpt.corpus(cfg, True).blend == ([a, b], [3.0, 1.0])
    cfg = script_args.read([*base, "--data-path", a, b], "pretrain_gpt.py")
    assert gpt.corpus(cfg, True).blend == ([a, b], None)  # weights from the datasets' sizes, as Megatron
    cfg = script_args.read([*base, "--train-data-path", a, "--valid-data-path", b, "--data-cache-path",
                            str(tmp_path / "cache")], "pretrain_gpt.py")
    source = gpt.corpus(cfg, True)
    assert source.blend_per_split == [([a], None), ([b], None), None]
    train, valid, test = D.build_datasets(16, 1, (8, 4, 0), blend_per_split=source.blend_per_split,
                                          cache_dir=cfg.data.cache_path)
    (fingerprint,) = (tmp_path / "cache").iterdir()  # Megatron's index files, under the data's fingerprint
    assert len(list(fingerprint.glob("*.npy"))) == 6  # document, sample, shuffle indices of train and valid
    assert test is None and set(valid[0]["tokens"].tolist()) <= set(range(50, 54)) | {D.EOD}
    assert set(train[0]["tokens"].tolist()) <= set(range(4)) | {D.EOD}
    for argv, field in ((["--data-path", "0.5", a, "0.5", str(tmp_path / "nothing")], "data.blend"),
                        (["--data-path", "0.5", a, b, "0.5"], "data.blend"),
                        (["--data-path", a, "--train-data-path", b], "data.train_path"),
                        (["--mock-data", "--data-path", a], "data.mock")):
        with pytest.raises(ConfigError) as err:
            gpt.corpus(translate.build(None, megatron_argv=[*base, *argv]), True)
        assert err.value.field == field, str(err.value)


def test_split_on_a_ten_document_corpus(tmp_path):
    """Megatron's default 969,30,1 gives 10 documents' valid and test splits none: the run trains when it does
    not read them (the splits are not built); when it does, the refusal names a split that works."""
    ten = _documents(tmp_path / "ten", 10)
    train, valid, test = D.build_datasets(32, 1, (50, 0, 0), blend=([ten], None), split="969, 30, 1",
                                          cache_dir=tmp_path / "cache")
    assert len(train) >= 50 and valid is None and test is None
    with pytest.raises(D.DataError) as err:
        D.build_datasets(32, 1, (50, 8, 8), blend=([ten], None), split="969, 30, 1", cache_dir=tmp_path / "cache")
    assert err.value.field == "data.split" and "valid split no document of the 10" in str(err.value)
    assert "--split 8,1,1" in err.value.fix
    train, valid, test = D.build_datasets(32, 1, (50, 8, 8), blend=([ten], None), split="8,1,1",
                                          cache_dir=tmp_path / "cache")
    assert len(valid) >= 8 and len(test) >= 8
    assert set(valid[0]["tokens"].tolist()) <= {8, D.EOD} and set(test[0]["tokens"].tolist()) <= {9, D.EOD}


def test_mock_data_is_megatrons_mock_dataset():
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    train, valid, test = D.build_datasets(64, 3, (20, 0, 0), mock=True)
    assert isinstance(train, MockGPTDataset) and valid is None and test is None and len(train) >= 20
    tokens = train[0]["tokens"]
    steps = (tokens[1:] - tokens[:-1]) % D.ByteTokenizer().vocab_size
    assert int((steps == 1).sum()) >= 60  # Megatron's mock documents count up: 1, 2, 3, ... then the EOD


def test_mock_data_trains_through_the_flags():
    from distributed import run_world
    from run_workers import run_logging

    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
            "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--no-progress", "--mock-data"]
    (result,) = run_world(1, run_logging, argv)
    losses = [r["loss"] for r in result["records"]]
    assert len(losses) == 3 and all(np.isfinite(losses)) and result["vocab"] == 257


def test_eod_mask_loss_and_reset_position_ids_are_megatrons(tmp_path):
    from zeromega.config import ConfigError
    from zeromega.launch import translate

    short = _documents(tmp_path / "short", 12, length=20)  # 21 ids per document: every sample crosses an EOD
    kw = dict(blend=([short], None), split="1,0,0", cache_dir=tmp_path / "cache")
    plain = D.build_datasets(32, 1, (10, 0, 0), **kw)[0][0]
    cfg = translate.build(None, megatron_argv=["--eod-mask-loss", "--reset-position-ids"])
    assert cfg.data.eod_mask_loss and cfg.data.reset_position_ids
    with pytest.raises(ConfigError, match="micro-batch means, not the tokens"):  # the mean would change
        translate.build(None, megatron_argv=["--eod-mask-loss", "--calculate-per-token-loss"])
    sample = D.build_datasets(32, 1, (10, 0, 0), eod_mask_loss=cfg.data.eod_mask_loss,
                              reset_position_ids=cfg.data.reset_position_ids, **kw)[0][0]
    tokens = sample["tokens"]
    assert torch.equal(tokens, plain["tokens"]) and bool((tokens == D.EOD).any())
    assert torch.equal(sample["loss_mask"], (tokens != D.EOD).float()) and bool((plain["loss_mask"] == 1).all())
    eod = int(torch.nonzero(tokens == D.EOD)[0])
    assert sample["position_ids"][eod + 1] == 0 and sample["position_ids"][eod] == plain["position_ids"][eod]


def test_a_ten_document_corpus_trains_with_megatrons_default_split(tmp_path):
    """Before: refused ('split leaves valid no document of 10') although the run read no validation data."""
    from distributed import run_world
    from run_workers import run_logging, run_refused

    ten = _documents(tmp_path / "ten", 10)
    argv = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
            "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--no-progress", "--data-path", ten]
    (result,) = run_world(1, run_logging, argv)
    assert len(result["records"]) == 2
    (line,) = run_world(1, run_refused, argv + ["--eval-interval", "1", "--eval-iters", "1"])
    assert line.startswith("data.split='969, 30, 1'") and "--split 8,1,1" in line and "\n" not in line, line


def _ids_file(prefix, ids, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in np.array_split(np.asarray(ids, dtype=dtype), 7):
        builder.add_document(doc, [doc.size])
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_largest_token_id_is_scanned_in_chunks_and_cached(tmp_path, monkeypatch):
    """The vocabulary check's scan: chunk by chunk through a memory map, once per version of the file."""
    monkeypatch.setenv("ZEROMEGA_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40_000, 100_003)
    ids[77_777] = 65_000
    prefix = _ids_file(tmp_path / "d", ids)
    assert D.largest_token_id(prefix, chunk_bytes=4096) == 65_000 == D.largest_token_id(prefix, cache=False)
    (entry,) = D.token_id_cache_dir().iterdir()
    assert D.token_id_cache_dir().parent == tmp_path / "cache"
    real_memmap = np.memmap
    monkeypatch.setattr(np, "memmap", None)  # a cached answer reads no token
    assert D.largest_token_id(prefix) == 65_000
    monkeypatch.setattr(np, "memmap", real_memmap)
    _ids_file(prefix, ids[:500], dtype=np.int32)  # rewritten: another size, time, inode, dtype
    assert D.largest_token_id(prefix) == int(ids[:500].max())
    assert list(D.token_id_cache_dir().iterdir()) == [entry]
    empty = tmp_path / "empty"
    _ids_file(empty, [])
    assert D.largest_token_id(empty) == -1


def test_rank0_scans_before_the_barrier_and_the_others_read_the_cache(tmp_path, monkeypatch):
    """gpt.corpus on rank 0 fills the cache; vocab_size on another rank then reads no token (the refusal too)."""
    from zeromega.config import ConfigError
    from zeromega.launch import translate
    from zeromega.run import gpt

    monkeypatch.setenv("ZEROMEGA_DATA", str(tmp_path / "cache"))
    prefix = _ids_file(tmp_path / "d", np.arange(300) % 257)
    other = _ids_file(tmp_path / "e", np.arange(400))
    cfg = translate.build(None, megatron_argv=["--data-path", "0.5", str(prefix), "0.5", str(other)])
    gpt.corpus(cfg, rank0=True)
    monkeypatch.setattr(np, "memmap", None)
    source = gpt.corpus(cfg, rank0=False)
    with pytest.raises(ConfigError, match=f"{other}.bin holds token id 399, outside the ByteTokenizer vocabulary"):
        gpt.vocab_size(cfg, source)


def test_no_mmap_bin_files_reads_with_file_reads_and_the_same_tokens(tmp_path):
    """``--no-mmap-bin-files`` reaches Megatron-Core's dataset config (before: accepted with a note and
    ignored): its .bin reader is the file reader, and the samples are the same."""
    from zeromega.launch import translate

    assert translate.build(None, megatron_argv=["--no-mmap-bin-files"]).data.mmap_bin_files is False
    assert translate.build(None, megatron_argv=[]).data.mmap_bin_files is True
    ten = _documents(tmp_path / "ten", 10)
    built = {}
    for mmap in (True, False):
        train, _, _ = D.build_datasets(32, 1, (20, 0, 0), blend=([ten], None), split="1,0,0",
                                       cache_dir=tmp_path / f"cache{mmap}", mmap_bin_files=mmap)
        built[mmap] = train
    assert type(built[True].dataset.bin_reader).__name__ == "_MMapBinReader"
    assert type(built[False].dataset.bin_reader).__name__ == "_FileBinReader"
    assert all(torch.equal(built[True][i]["tokens"], built[False][i]["tokens"]) for i in range(20))
