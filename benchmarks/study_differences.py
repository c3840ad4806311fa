"""The study's code against vqabench's objectives, each difference measured on one batch.

For docs/objectives.md, "Differences from the study's code". One easy-VQA batch, the
embedded model (random initial weights, seed 0, or --checkpoint FOLDER), losses from the
engine's own functions; every line compares the study's choice with vqabench's default:

    python benchmarks/study_differences.py [--batch-size 32] [--checkpoint FOLDER]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from vqabench import objectives
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.reference import CopyReference
from vqabench.engine.trainer import MethodStep, Trainer
from vqabench.models import blip, checkpoints, parts
from vqabench.models.blip_masks import cross_attention_modules
from vqabench.models.family import pad_right
from vqabench.spec import DatasetSpec, RunSpec


def rejected_on_chosen_inputs(decoder, q, q_mask, chosen, rejected) -> torch.Tensor:
    """The study's rejected log-prob: rejected labels scored on the CHOSEN answer's input tokens."""
    c_ids, c_mask = chosen
    r_ids, r_mask = rejected
    width = max(c_ids.shape[1], r_ids.shape[1])
    c_ids, c_mask = pad_right(c_ids, c_mask, width, 0)
    r_ids, r_mask = pad_right(r_ids, r_mask, width, 0)
    logits = decoder(
        input_ids=c_ids,
        attention_mask=c_mask,
        encoder_hidden_states=q,
        encoder_attention_mask=q_mask,
        return_logits=True,
    )
    logp = torch.log_softmax(logits.float(), -1).gather(-1, r_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * r_mask[:, 1:]).sum(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    n = args.batch_size
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=n)
    loaded = checkpoints.load_pretrained(args.checkpoint) if args.checkpoint else blip.build_embedded(seed=0)
    encoded = encode(data, loaded, 32, 16)
    model, decoder = loaded.model.eval(), loaded.model.text_decoder
    batch = encoded.batch("train", torch.arange(n), torch.device("cpu"))
    out = []
    with torch.no_grad():
        q = blip.encode_questions(model, batch.pixel_values, batch.question_ids, batch.question_mask)
        c, r, c_len, r_len = blip.pair_logps(decoder, q, batch.question_mask, batch.chosen, batch.rejected, 0)
        lengths = sorted(set(c_len.tolist()) | set(r_len.tolist()))
        out.append(f"batch of {n} easy-VQA pairs; scored answer lengths (tokens + SEP): {lengths}")

        # 1. rejected teacher-forced on the chosen answer's tokens
        r_study = rejected_on_chosen_inputs(decoder, q, batch.question_mask, batch.chosen, batch.rejected)
        orpo_ours = objectives.orpo_loss(c, r, c_len, r_len, 0.5).mean()
        orpo_tf = objectives.orpo_loss(c, r_study, c_len, r_len, 0.5).mean()
        out.append(
            f"1. rejected teacher-forced on chosen tokens: mean rejected log-prob {float(r.mean()):.4f} (ours) vs "
            f"{float(r_study.mean()):.4f} (study); ORPO loss {float(orpo_ours):.4f} vs {float(orpo_tf):.4f}"
        )
        # 2. ORPO odds from summed log-probs
        orpo_sum = objectives.orpo_loss(c, r, c_len, r_len, 0.5, average=False).mean()
        out.append(
            f"2. ORPO odds from token-mean vs summed log-probs (orpo_logps): loss {float(orpo_ours):.4f} (mean) vs "
            f"{float(orpo_sum):.4f} (sum)"
        )
        # 3. label smoothing 0.1 in HF's BLIP loss
        sft = MethodStep(RunSpec(name="s", method="sft"), loaded, encoded, None)("train", batch).losses.mean()
        smooth_spec = RunSpec(name="s", method="sft", sft_label_smoothing=0.1)
        sft_smooth = MethodStep(smooth_spec, loaded, encoded, None)("train", batch).losses.mean()
        out.append(
            f"3. SFT label smoothing (sft_label_smoothing): loss {float(sft):.4f} (0, ours) vs "
            f"{float(sft_smooth):.4f} (0.1, HF's BLIP loss)"
        )
        # 4. SEP is scored: a one-word answer has two scored tokens
        one_word = c_len == 2
        if bool(one_word.any()):
            out.append(
                "4. one-word answers score 2 tokens (the word and SEP): "
                f"summed log-prob {float(c[one_word].mean()):.4f} vs "
                f"token mean {float((c / c_len)[one_word].mean()):.4f}; they do not coincide"
            )
        # 5. cross-attention mask: padding questions to 12 and 32 tokens
        tok = loaded.tokenizer
        texts = [p.question for p in data.train[:n]]
        scores = {}
        for hooked in (True, False):
            handles = []
            if not hooked:  # the library's behaviour: the mask is dropped
                for module in cross_attention_modules(model):
                    saved = dict(module._forward_pre_hooks)
                    module._forward_pre_hooks.clear()
                    handles.append((module, saved))
            try:
                for width in (12, 32):
                    qq = tok(texts, padding="max_length", max_length=width, truncation=True, return_tensors="pt")
                    e = blip.encode_questions(model, batch.pixel_values, qq.input_ids, qq.attention_mask)
                    scores[hooked, width] = blip.answer_logps(decoder, e, qq.attention_mask, *batch.chosen)[0]
            finally:
                for module, saved in handles:
                    module._forward_pre_hooks.update(saved)
        for hooked, label in ((False, "mask dropped (transformers 5 as shipped)"), (True, "mask honoured (vqabench)")):
            diff = (scores[hooked, 12] - scores[hooked, 32]).abs().max()
            out.append(
                f"5. {label}: max |log-prob(question padded to 12) − log-prob(padded to 32)| = {float(diff):.2e}"
            )
    # 6. dropout: DPO's loss at step 0 from its own reference, over 5 dropout draws
    for disable in (False, True):
        values = []
        for seed in range(5):
            fresh = checkpoints.load_pretrained(args.checkpoint) if args.checkpoint else blip.build_embedded(seed=0)
            spec = RunSpec(name="d", method="dpo", init_checkpoint="x", disable_dropout=disable, batch_size=n)
            trainer = Trainer(spec, fresh, encoded, CopyReference(fresh, "decoder"), torch.device("cpu"))
            parts.set_train_mode(fresh, "decoder")
            torch.manual_seed(seed)
            with torch.no_grad():
                values.append(float(trainer.step_fn("train", batch).losses.mean()))
        label = "dropout off (disable_dropout = true)" if disable else "dropout on (before)"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(
            f"6. DPO step-0 loss, {label}: {statistics.mean(values):.6f} ± {spread:.6f} (sd over 5 draws); "
            f"log 2 = {math.log(2):.6f}"
        )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
