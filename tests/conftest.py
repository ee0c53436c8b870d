import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's interpreter where there is no GPU; triton reads the flag
    # when it is first imported, so it is set before any test module can import it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("ROLLOUT_TEST_VECTORIZE") != "1":
    # The compiled-step tests check what our code hands Inductor (graph capture, guards, the
    # in-place slot writes), not Inductor's CPU vector code generation, which is about half of
    # their compile time (119 s -> 62 s for the AR step graphs of one engine, cold cache, here).
    # ROLLOUT_TEST_VECTORIZE=1 compiles them with vector kernels, as serving does.
    import torch._inductor.config  # noqa: E402

    torch._inductor.config.cpp.simdlen = 1

import pytest  # noqa: E402

from rollout import Engine  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Qwen2-shaped random model, vocab 16 (mask id 15, EOS 1), block length 4."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", vocab_size=16, block_size=4)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    return Engine.from_pretrained(tiny_dir, config=EngineConfig(drafting="fixed"))


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12], [3, 3, 3, 3, 9]]


@pytest.fixture
def make_replica(tiny_dir):
    """make_replica(name, **kwargs): an in-process GeneratorReplica on the tiny model, closed at
    teardown (its engine loop and metrics server stopped: no thread outlives the test)."""
    from rollout.service.replica import GeneratorReplica

    made = []

    def make(name: str, **kwargs):
        kwargs.setdefault("engine_config", EngineConfig(drafting="fixed"))  # tests compare with `engine`'s steps
        made.append(GeneratorReplica(str(tiny_dir), name, metrics_port=None, **kwargs))
        return made[-1]
    yield make
    for r in made:
        r.close()


def pytest_sessionfinish(session, exitstatus):
    """Objects the tests dropped (a gRPC channel, say) are freed now, while the interpreter is
    whole; left to its shutdown, a channel's poller thread can crash the process after a green run."""
    import gc

    gc.collect()
