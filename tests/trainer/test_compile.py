"""torch_compile=True: the perturbation changes the weights in place, so compiled graphs stay valid."""

import torch
import torch._dynamo.utils
from transformers import set_seed

from ..helpers import WeightRecorder, sam_trainer
from ..tiny import make_data


class CompileNet(torch.nn.Module):
    """TinyNet without Python-side counters (those would force dynamo to recompile every call)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.bn = torch.nn.BatchNorm1d(7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x, labels):
        logits = self.fc2(self.bn(torch.tanh(self.fc1(x))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _run(tmp_path, **kw):
    set_seed(0)
    model = CompileNet()
    rec = WeightRecorder()
    trainer = sam_trainer(
        tmp_path, model, make_data(12, dtype=torch.float32), [rec], max_steps=3, sam_ascent_steps=2, sam_rho=0.3, **kw
    )
    trainer.train()
    return rec.final, {n: b.clone() for n, b in model.named_buffers()}


def test_compiled_sam_matches_eager(tmp_path):
    eager, eager_buffers = _run(tmp_path / "eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled, compiled_buffers = _run(tmp_path / "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, f"the model ran compiled, without a recompile per step ({graphs} graphs)"
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
    for name in eager_buffers:  # BatchNorm statistics: the clean pass only, compiled or not
        torch.testing.assert_close(compiled_buffers[name].float(), eager_buffers[name].float(), rtol=1e-5, atol=1e-6)
