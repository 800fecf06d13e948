import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import InputError
from secfedtl.training.evaluate import evaluate


def test_accuracy_and_loss():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    x, y = torch.randn(50, 3), torch.randint(0, 4, (50,))
    m.train()
    result = evaluate(m, TensorDataset(x, y), batch_size=7)
    assert m.training  # mode restored
    with torch.no_grad():
        m.eval()
        logits = m(x)
    assert result.num_samples == 50
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_empty():
    with pytest.raises(InputError):
        evaluate(nn.Linear(2, 2), TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
