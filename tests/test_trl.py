"""dtokd's DistillationTrainer composed with TRL's SFTTrainer (``class X(DistillationTrainer,
trl.SFTTrainer)``): TRL prepares and collates the data (its tokenisation, padding and -100
labels), dtokd's ``compute_loss`` balances the token KD against the next-token CE. Tested with
the real TRL on the CPU against the plain PyTorch loop on the same collated batches."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL composition needs trl")
datasets = pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")
tokenizers = pytest.importorskip("tokenizers", reason="a local tokenizer needs tokenizers")
transformers = pytest.importorskip("transformers", reason="TRL needs transformers")

from dtokd import make_balancer  # noqa: E402
from dtokd.integrations.common import causal_lm_losses  # noqa: E402
from dtokd.integrations.transformers import DistillationTrainer  # noqa: E402

from helpers import tiny_llamas  # noqa: E402


class SFTDistillationTrainer(DistillationTrainer, trl.SFTTrainer):
    """dtokd's compute_loss first in the method order; TRL's data handling underneath."""

    def _get_train_sampler(self, *args, **kwargs):  # batches in the dataset's order, for the reference
        return torch.utils.data.SequentialSampler(self.train_dataset)


def tokenizer():
    vocabulary = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(37)}}
    model = tokenizers.models.WordLevel(vocabulary, unk_token="<unk>")
    core = tokenizers.Tokenizer(model)
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def llamas():
    """The shared tiny pair, with the tokenizer's pad and end tokens and room for 32 positions."""
    return tiny_llamas(max_position_embeddings=32, pad_token_id=0, eos_token_id=2, bos_token_id=2)


def texts(n=12):
    """Sentences of different lengths, so that TRL's collator pads (labels -100 there)."""
    g = torch.Generator().manual_seed(3)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(0, 37, (int(k),), generator=g))
        for k in torch.randint(4, 12, (n,), generator=g)
    ]


@pytest.mark.parametrize("engine", ["representation", "exact"])
def test_sft_trainer_composition_equals_the_plain_loop_on_its_batches(tmp_path, engine):
    student, teacher = llamas()
    reference = copy.deepcopy(student)
    losses = causal_lm_losses("forward_kl")
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        packing=False,
    )
    trainer = SFTDistillationTrainer(
        model=student,
        teacher=teacher,
        method="dto",
        engine=engine,
        losses=losses,
        args=args,
        processing_class=tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"text": texts()}),
    )
    batches = list(trainer.get_train_dataloader())[:3]
    assert any((b["labels"] == -100).any() for b in batches)  # TRL padded and masked: the masks are exercised
    trainer.train()
    balancer = make_balancer("dto", reference.parameters(), engine=engine)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = reference(**inputs).logits
        with torch.no_grad():
            t = teacher(**inputs).logits
        balancer.backward(
            losses(logits, t, batch["labels"]), representation=logits if engine == "representation" else None
        )
        optimizer.step()
        optimizer.zero_grad()
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    logged = [row for row in trainer.state.log_history if "dtokd/weight/distill" in row]
    assert len(logged) == 3
