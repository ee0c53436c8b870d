"""What a lookup step teaches the drafting policy: acceptance goes under the lookup class only for
rows that verified lookup drafts; the other rows of the step (mixed rows, rows without a match)
verified the model's own drafts and are learned under their own class."""

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import DraftShape
from rollout.train.tiny import make_tiny_model


def test_a_lookup_step_records_only_the_rows_that_verified_lookup_drafts_as_lookup(tmp_path):
    engine = Engine.from_pretrained(make_tiny_model(tmp_path, "qwen2", vocab_size=16, block_size=4),
                                    config=EngineConfig(drafting="auto", history_mib=0))  # lookup drafts only
    k = engine.tidar.block_size
    steps = iter([DraftShape(k, (1, 2))] * 2)  # two TiDAR steps give every row drafts, then lookup steps
    engine.drafting.choose = lambda params, context, lookups=None: next(steps, DraftShape(k, (), lookup=True))
    engine.drafting.wants_lookup = lambda params: True
    engine.generate([[2, 3, 2, 3, 2, 3, 2, 3]], SamplingParams(max_tokens=24, temperature=0))
    engine.generate([[5, 6, 7]], SamplingParams(sampler="mixed", max_tokens=24, temperature=1.0, seed=0))
    classes = set(engine.drafting.estimates)
    assert "lossless@0+lookup" in classes  # the repetitive lossless row verified lookup drafts
    assert not [c for c in classes if c.startswith("mixed") and c.endswith("+lookup")], classes
    assert any(c.startswith("mixed") for c in classes)  # its TiDAR drafts, learned as such
    assert not [label for label in engine.last_stats.level_choices if label.startswith("lookup")]
