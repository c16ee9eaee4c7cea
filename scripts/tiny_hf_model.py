"""Writes a tiny random Hugging Face checkpoint of a released gated-DeltaNet hybrid, with a
byte-level BPE tokenizer learned from a text file, for trying fwpzoo import / export and the
layers they use without downloading anything (needs torch and transformers: pip install -e
".[test]").

    python scripts/tiny_hf_model.py qwen3_5 /tmp/tiny-qwen --vocab 512 --d-model 64
    fwpzoo import /tmp/tiny-qwen --workdir runs/tiny-qwen

The layout is a release's at a small size: three gated DeltaNet layers per attention layer,
value heads = 2 x key heads, grouped-query attention, Qwen3.5's quarter rotary.
"""

import argparse
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "carroll-alice.txt"


def tokenizer_from(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=alphabet)
    )
    return tokenizer


def model_of(architecture: str, vocab: int, d_model: int, layers: int):
    import transformers

    heads = max(d_model // 16, 2)
    fields = {
        "vocab_size": vocab,
        "hidden_size": d_model,
        "intermediate_size": 3 * d_model,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "linear_num_key_heads": heads // 2,
        "linear_num_value_heads": heads,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    }
    if architecture == "qwen3_5":
        config = transformers.Qwen3_5TextConfig(head_dim=16, **fields)
        return transformers.Qwen3_5ForCausalLM(config)
    config = transformers.OlmoHybridConfig(pad_token_id=0, eos_token_id=1, **fields)
    return transformers.OlmoHybridForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("architecture", choices=("qwen3_5", "olmo_hybrid"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=FIXTURE, help="what the tokenizer learns")
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    model = model_of(args.architecture, args.vocab, args.d_model, args.layers)
    model.save_pretrained(args.out)
    tokenizer_from(args.text.read_text(), args.vocab).save(str(args.out / "tokenizer.json"))
    print(args.out)


if __name__ == "__main__":
    main()
