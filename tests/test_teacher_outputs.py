"""Offline top-k teacher outputs (dtokd.data.teacher_outputs): read back equal to a fresh teacher
forward's top-k; at k = vocabulary the distillation loss equals full-logit KD, below it the
(k+1)-bucket divergence by hand; half-precision rounding leaves the tail finite; a manifest that
does not match, a truncated or corrupt shard and a folder that would be overwritten are refused."""

import json

import pytest
import torch
from torch import nn

from helpers import tiny_llamas

pytest.importorskip("transformers", reason="the teacher is a tiny Hugging Face Llama")

from dtokd.data.block_hash import block_hashes  # noqa: E402
from dtokd.data.teacher_outputs import TeacherOutputs  # noqa: E402
from dtokd.data.teacher_outputs_writer import (  # noqa: E402
    corpus_digest,
    teacher_checksum,
    top_log_probs,
    write_teacher_outputs,
)
from dtokd.data.text import TokenBlocks  # noqa: E402
from dtokd.losses import token_kd_loss  # noqa: E402
from dtokd.losses.token_kd import DIVERGENCES  # noqa: E402

VOCABULARY, LENGTH, BLOCKS = 40, 8, 10


def corpus(seed=0, count=BLOCKS):
    """Token blocks of ``LENGTH + 1`` ids (inputs ``block[:-1]``, targets ``block[1:]``)."""
    g = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(0, VOCABULARY, (count, LENGTH + 1), generator=g, dtype=torch.int32))


def teacher64():
    """The tiny Llama teacher in float64: a fresh forward and the writer's batched one agree to
    float64 rounding, far below a half-precision step, so the rounded outputs compare exactly."""
    return tiny_llamas()[1].double()


def write(folder, teacher=None, blocks=None, **options):
    settings = {
        **dict(k=5, tokenizer="tok-1", teacher_name="teacher-64", temperature=2.0, batch_size=3, shard_bytes=1100),
        **options,
    }
    return write_teacher_outputs(teacher or teacher64(), corpus() if blocks is None else blocks, folder, **settings)


def test_outputs_read_back_equal_a_fresh_teacher_forwards_top_k(tmp_path):
    teacher, blocks = teacher64(), corpus()
    reported: list[tuple[int, int]] = []
    manifest = write(tmp_path / "out", teacher, blocks, progress=lambda done, total: reported.append((done, total)))
    assert len(manifest.shards) == 3  # 8 x (5 x 6 + 4) = 272 bytes a block, ~1100 a shard: 4 + 4 + 2 blocks
    assert [(s.start, s.stop) for s in manifest.shards] == [(0, 4), (4, 8), (8, 10)]
    assert reported == [(4, 10), (8, 10), (10, 10)]  # after each shard
    assert (manifest.block_length, manifest.num_blocks, manifest.vocab_size) == (LENGTH, BLOCKS, VOCABULARY)
    assert manifest.corpus_digest == corpus_digest(blocks) == corpus_digest(blocks.blocks[:, :-1])
    assert manifest.teacher_hash == teacher_checksum(teacher)
    with torch.no_grad():
        expected = top_log_probs(teacher(blocks.blocks[:, :-1].long()).logits, 5, 2.0)
    outputs = TeacherOutputs(tmp_path / "out")
    order = torch.tensor([[7, 0], [3, 9]])  # across shards, any shape
    log_probs, indices = outputs.topk(order)
    assert log_probs.shape == indices.shape == (2, 2, LENGTH, 5)
    assert log_probs.dtype == torch.float16 and indices.dtype == torch.int64
    torch.testing.assert_close(indices, expected.indices[order], rtol=0, atol=0)
    torch.testing.assert_close(log_probs, expected.values[order].half(), rtol=0, atol=0)
    assert (log_probs[..., :-1] >= log_probs[..., 1:]).all()  # decreasing
    assert torch.equal(outputs.input_ids(order), blocks.blocks[:, :-1][order])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_at_k_equal_to_the_vocabulary_the_loss_and_gradient_equal_full_logit_kd(tmp_path, divergence):
    teacher, blocks = teacher64(), corpus()
    write(tmp_path / "out", teacher, blocks, k=VOCABULARY, dtype=torch.float32)
    inputs, targets = blocks.__getitems__(list(range(6)))
    g = torch.Generator().manual_seed(1)
    student = (2 * torch.randn(6, LENGTH, VOCABULARY, generator=g, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():
        teacher_logits = teacher(inputs).logits
    full = token_kd_loss(student, teacher_logits, targets, divergence=divergence, temperature=2.0)
    offline = token_kd_loss(
        student,
        labels=targets,
        divergence=divergence,
        temperature=2.0,
        teacher_topk=TeacherOutputs(tmp_path / "out").topk(range(6)),
    )
    (full_grad,) = torch.autograd.grad(full, student)
    (offline_grad,) = torch.autograd.grad(offline, student)
    # float32 outputs: the teacher's log-probabilities to ~1e-7 relative
    torch.testing.assert_close(offline, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(offline_grad, full_grad, rtol=1e-5, atol=1e-8)


def bucket_divergence_by_hand(student, log_probs, indices, temperature):
    """Forward KL over the k teacher tokens and the tail, one token at a time, in float64."""
    total, count = 0.0, 0
    for s, lq, idx in zip(student.reshape(-1, VOCABULARY), log_probs.reshape(-1, 5), indices.reshape(-1, 5)):
        p = torch.softmax(s / temperature, 0)
        q = lq.double().exp()
        pb = torch.cat([p[idx], (1 - p[idx].sum()).reshape(1)])
        qb = torch.cat([q, (1 - q.sum()).reshape(1)])
        total, count = total + (qb * (qb.log() - pb.log())).sum(), count + 1
    return total * temperature**2 / count


def test_below_the_vocabulary_the_loss_is_the_bucket_divergence_by_hand(tmp_path):
    blocks = corpus()
    write(tmp_path / "out", blocks=blocks)
    log_probs, indices = TeacherOutputs(tmp_path / "out").topk([2, 5, 9])
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, LENGTH, VOCABULARY, generator=g, dtype=torch.float64, requires_grad=True)
    ours = token_kd_loss(student, temperature=2.0, teacher_topk=(log_probs, indices))
    expected = bucket_divergence_by_hand(student, log_probs, indices, 2.0)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(ours, student)[0], torch.autograd.grad(expected, student)[0], rtol=1e-9, atol=1e-12
    )


class PeakedTeacher(nn.Module):
    """Logits depending on the current token only: one token far above the others, so that its
    log-probability, about ``-V e^-30``, rounds to 0 in half precision."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(VOCABULARY, VOCABULARY)
        with torch.no_grad():
            self.table.weight.zero_()
            self.table.weight[torch.arange(VOCABULARY), (torch.arange(VOCABULARY) + 1) % VOCABULARY] = 30.0

    def forward(self, input_ids):
        return self.table(input_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [3, VOCABULARY])
def test_half_precision_rounding_never_makes_the_tail_negative_or_nan(tmp_path, dtype, k):
    write(tmp_path / "out", PeakedTeacher(), k=k, dtype=dtype, temperature=1.0)
    log_probs, indices = TeacherOutputs(tmp_path / "out").topk(range(BLOCKS))
    assert (log_probs.double().exp().sum(-1) > 1).any()  # the rounded top-k holds more than all the mass
    student = torch.randn(BLOCKS, LENGTH, VOCABULARY, dtype=torch.float64, requires_grad=True)
    for divergence in DIVERGENCES:
        loss = token_kd_loss(student, divergence=divergence, teacher_topk=(log_probs, indices))
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and loss >= 0 and torch.isfinite(grad).all(), divergence


def test_matching_expectations_are_accepted(tmp_path):
    teacher, blocks = teacher64(), corpus()
    write(tmp_path / "out", teacher, blocks)
    outputs = TeacherOutputs(
        tmp_path / "out",
        teacher_name="teacher-64",
        teacher_hash=teacher_checksum(teacher),
        tokenizer="tok-1",
        corpus_digest=corpus_digest(blocks),
        block_length=LENGTH,
        vocab_size=VOCABULARY,
        k=5,
        temperature=2,
        dtype=torch.float16,
    )
    outputs.verify()
    assert len(outputs) == BLOCKS


@pytest.mark.parametrize(
    "field, value",
    [
        ("teacher_name", "hf-causal-lm:/elsewhere"),
        ("teacher_hash", "0" * 64),
        ("tokenizer", "tok-2"),
        ("corpus_digest", corpus_digest(corpus(seed=1))),
        ("block_length", 16),
        ("vocab_size", 41),
        ("k", 8),
        ("temperature", 1.0),
        ("dtype", "bfloat16"),
    ],
)
def test_a_manifest_field_that_does_not_match_the_run_is_refused_naming_it(tmp_path, field, value):
    write(tmp_path / "out")
    actual = json.loads((tmp_path / "out" / "manifest.json").read_text())[field]
    with pytest.raises(ValueError, match=f"field '{field}' is {actual!r} there, the run expects {value!r}") as error:
        TeacherOutputs(tmp_path / "out", **{field: value})
    assert "\n" not in str(error.value)


def test_an_unknown_expected_field_and_an_unfinished_write_are_refused(tmp_path):
    write(tmp_path / "out")
    with pytest.raises(TypeError, match="unknown expected field"):
        TeacherOutputs(tmp_path / "out", vocabulary=40)
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TeacherOutputs(tmp_path / "out")


def damage_file(path, damage):
    content = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "flipped byte":
        content[len(content) // 2] ^= 0x01
        path.write_bytes(content)
    else:
        path.unlink()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_a_damaged_index_is_refused_naming_the_file_and_opens_no_shard(tmp_path, damage):
    write(tmp_path / "out")
    damage_file(tmp_path / "out" / "blocks.pt", damage)
    outputs = TeacherOutputs(tmp_path / "out")
    with pytest.raises((ValueError, FileNotFoundError), match="blocks.pt"):
        outputs.block_hashes()
    assert outputs._open == {}
    outputs.topk([0, 9])  # the shards themselves are intact


def test_the_index_holds_each_blocks_content_hash_in_order(tmp_path):
    blocks = corpus()
    write(tmp_path / "out", blocks=blocks)
    outputs = TeacherOutputs(tmp_path / "out")
    torch.testing.assert_close(outputs.block_hashes(), block_hashes(blocks.blocks[:, :-1]), rtol=0, atol=0)
    assert outputs._open == {}  # read without a shard


def test_a_folder_of_an_older_format_is_refused_by_name(tmp_path):
    write(tmp_path / "out")
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["index"], manifest["teacher_name"]
    path.write_text(json.dumps({**manifest, "format": "dtokd-teacher-topk-v2"}))
    with pytest.raises(ValueError, match="'dtokd-teacher-topk-v2', this dtokd reads 'dtokd-teacher-topk-v3'.*write"):
        TeacherOutputs(tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_a_damaged_shard_is_refused_naming_the_file_when_first_opened(tmp_path, damage):
    write(tmp_path / "out")
    damage_file(tmp_path / "out" / "shard-00001.pt", damage)
    outputs = TeacherOutputs(tmp_path / "out")
    outputs.topk([9])
    assert sorted(outputs._open) == [2]  # a read opens the shards of its blocks only
    outputs.topk([0, 9])  # shards 0 and 2 are intact
    with pytest.raises((ValueError, FileNotFoundError), match="shard-00001.pt"):
        outputs.topk([5])
    with pytest.raises((ValueError, FileNotFoundError), match="shard-00001.pt"):
        TeacherOutputs(tmp_path / "out").verify()


def test_a_folder_that_would_be_overwritten_is_refused_unless_asked(tmp_path):
    write(tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="never written over unasked"):
        write(tmp_path / "out", k=3)
    assert (tmp_path / "out" / "manifest.json").read_text() == before
    (tmp_path / "out" / "notes.txt").write_text("mine")
    manifest = write(tmp_path / "out", k=3, shard_bytes=10**6, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "blocks.pt",
        "manifest.json",
        "notes.txt",
        "shard-00000.pt",
    ]
    assert manifest.k == 3 and TeacherOutputs(tmp_path / "out", k=3).topk(0)[0].shape == (LENGTH, 3)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="k=41 exceeds the teacher's vocabulary"):
        write(tmp_path / "a", k=41)
    with pytest.raises(ValueError, match="dtype"):
        write(tmp_path / "b", dtype=torch.int8)
    with pytest.raises(ValueError, match="temperature"):
        write(tmp_path / "c", temperature=0)


class Rows(torch.utils.data.Dataset):
    """Causal-LM items as the Hugging Face Trainer takes them: input ids, labels = the ids."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_in_order(tmp_path, student, teacher, dataset, steps=3):
    pytest.importorskip("accelerate", reason="the Trainer integration needs accelerate")
    import transformers

    from dtokd.integrations.common import causal_lm_losses
    from dtokd.integrations.transformers import DistillationTrainer

    class InOrder(DistillationTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    losses = causal_lm_losses("forward_kl", temperature=2.0)
    trainer = InOrder(model=student, teacher=teacher, method="dto", losses=losses, args=args, train_dataset=dataset)
    trainer.train()
    return student


def test_the_trainer_from_offline_outputs_at_k_equal_to_the_vocabulary_equals_the_live_teacher(tmp_path):
    from dtokd.data.offline_teacher import WithTeacherTopk

    student, teacher = tiny_llamas()
    ids = corpus(count=12).blocks[:, :-1].long()
    write(tmp_path / "out", teacher, ids, k=VOCABULARY, dtype=torch.float32)
    outputs = TeacherOutputs(tmp_path / "out", corpus_digest=corpus_digest(ids), teacher_hash=teacher_checksum(teacher))
    reference = train_in_order(tmp_path / "live", tiny_llamas()[0], teacher, Rows(ids))
    offline = train_in_order(tmp_path / "offline", student, None, WithTeacherTopk(Rows(ids), outputs))
    for (name, a), b in zip(offline.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(offline.lm_head.weight, tiny_llamas()[0].lm_head.weight)  # it trained


def test_the_trainer_without_a_teacher_refuses_a_batch_without_the_columns(tmp_path):
    ids = corpus(count=4).blocks[:, :-1].long()
    with pytest.raises(KeyError, match="WithTeacherTopk"):
        train_in_order(tmp_path, tiny_llamas()[0], None, Rows(ids), steps=1)


def test_a_reader_sent_to_a_worker_opens_its_shards_again(tmp_path):
    import pickle

    write(tmp_path / "out")
    outputs = TeacherOutputs(tmp_path / "out")
    expected = outputs.topk([1, 8])
    copy = pickle.loads(pickle.dumps(outputs))
    assert copy._open == {}
    torch.testing.assert_close(copy.topk([1, 8]), expected, rtol=0, atol=0)
