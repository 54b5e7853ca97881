"""Two CPU processes (gloo) give the same moments and pooled features as one."""

import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ntps_nb.extract import Extraction, extract
from tests.io.test_extract import LABELS, TEXTS, few_word_texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, float32_few_words: bool = False) -> None:
    import torch.distributed as dist

    from ntps_nb.models import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok, _ = load_model("tiny-llama", dtype=torch.float64, seed=0)
        if float32_few_words:
            result = extract(model, tok, few_word_texts(), precision="float32", progress=False, shards=4,
                             half_layers=[0])
        else:
            result = extract(model, tok, (TEXTS, LABELS), batch_size=2, precision="float64", progress=False,
                             pooled_layers=[1], shards=2, shard_layers=[2])
        if rank == 0:
            result.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on localhost is exercised on Linux")
def test_two_processes_equal_one(tmp_path):
    from ntps_nb.models import load_model

    # load first: on a fresh cache this converts the SmolLM2 tokenizer once, before two workers race for it
    model, tok, _ = load_model("tiny-llama", dtype=torch.float64, seed=0)
    out = tmp_path / "two"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = Extraction.load(out)
    one = extract(model, tok, (TEXTS, LABELS), batch_size=2, precision="float64", progress=False,
                  pooled_layers=[1], shards=2, shard_layers=[2])
    assert two.metadata["world_size"] == 2
    for layer in one.moments:
        for name, value in one.moments[layer].arrays().items():
            np.testing.assert_allclose(getattr(two.moments[layer], name), value, rtol=1e-12, atol=1e-12 * np.abs(value).max())
    np.testing.assert_array_equal(two.pooled[1], one.pooled[1])
    for a, b in zip(one.shards, two.shards):
        np.testing.assert_allclose(a[2].C0, b[2].C0, rtol=1e-12)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on localhost is exercised on Linux")
def test_two_processes_decide_alike_to_pass_a_layer_again_in_float64(tmp_path):
    """Float32 products whose rounding reaches C0's range at the embedding layer (few distinct words): both
    ranks take rank 0's decision and pass that layer again together; the result is one process's."""
    from ntps_nb.models import load_model

    model, tok, _ = load_model("tiny-llama", dtype=torch.float64, seed=0)
    out = tmp_path / "two"
    mp.spawn(_worker, args=(2, _free_port(), str(out), True), nprocs=2, join=True)
    two = Extraction.load(out)
    one = extract(model, tok, few_word_texts(), precision="float32", progress=False, shards=4, half_layers=[0])
    assert two.metadata["world_size"] == 2 and two.metadata["float64_layers"] == one.metadata["float64_layers"] == [0]
    for layer in one.moments:  # float64 products at layer 0; float32 ones, summed in other groups, elsewhere
        scale = 1e-12 if layer == 0 else 1e-6
        for name, value in one.moments[layer].arrays().items():
            np.testing.assert_allclose(getattr(two.moments[layer], name), value, rtol=scale,
                                       atol=scale * np.abs(value).max(), err_msg=f"{layer} {name}")
    for a, b in zip(one.halves, two.halves):
        np.testing.assert_allclose(a[0].C0, b[0].C0, rtol=1e-12, atol=1e-14 * np.abs(a[0].C0).max())
