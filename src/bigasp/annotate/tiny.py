"""Tiny annotation models in the published folder layouts, built from small configs.

The same classes as the real models (CLIPVisionModel, an ONNX tagger, Owlv2ForObjectDetection,
LlavaForConditionalGeneration with a Llama text model) with random weights, saved the way the
real checkpoints are published, so `bigasp bench annotate` and the tests run the real loading
and inference code on CPU in seconds. Writing the ONNX tagger needs the `onnx` package (dev).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from bigasp.errors import BigaspError

LLAVA_WORDS = [
    "you",
    "are",
    "a",
    "helpful",
    "image",
    "captioner",
    "write",
    "descriptive",
    "caption",
    "for",
    "this",
    "in",
    "formal",
    "casual",
    "tone",
    "within",
    "words",
    "stable",
    "diffusion",
    "prompt",
    "midjourney",
    "include",
    "whether",
    "the",
    "is",
    "sfw",
    "suggestive",
    "or",
    "nsfw",
    ".",
    ",",
    "photo",
    "of",
    "woman",
    "man",
    "dog",
    "cat",
    "red",
    "blue",
    "green",
    "sky",
    "tree",
    "house",
    "street",
    "light",
    "dark",
    "bright",
]
LLAVA_SPECIAL = ["<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|finetune_right_pad_id|>", "<image>"]  # fmt: skip
LLAVA_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
    "{% if m['role'] == 'user' %}<image> {% endif %}{{ m['content'] }} <|eot_id|> {% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|> {% endif %}"
)


def clip_vision(path: Path, *, side: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=side, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModel(cfg).save_pretrained(path)
    Processor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)
    return path


def onnx_tagger(
    path: Path, *, kind: str, n_tags: int = 12, side: int = 64, seed: int = 0, wrong_tags: int = 0
) -> Path:
    """A linear tagger on the channel means: JoyTag layout (NCHW in, logits out, top_tags.txt) or
    WD layout (NHWC BGR 0..255 in, sigmoid out, selected_tags.csv with ratings/general/character)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise BigaspError("writing the tiny ONNX tagger needs the onnx package: pip install onnx") from None
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    nchw = kind == "joytag"
    in_shape = ["N", 3, side, side] if nchw else ["N", side, side, 3]
    axes = [2, 3] if nchw else [1, 2]
    scale = 4.0 if nchw else 4.0 / 255.0
    w = (rng.normal(size=(3, n_tags)) * scale).astype(np.float32)
    b = rng.normal(size=(n_tags,)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits" if nchw else "z"]),
    ]
    if not nchw:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_tags])],
        initializer=[
            numpy_helper.from_array(np.array(axes, np.int64), "axes"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path / "model.onnx"))
    n_list = n_tags + wrong_tags
    if kind == "joytag":
        (path / "top_tags.txt").write_text("".join(f"tag_{i}\n" for i in range(n_list)))
    else:
        rows = ["tag_id,name,category,count"]
        for i in range(n_list):
            cat = 9 if i < 4 else (4 if i % 5 == 0 else 0)
            name = ["general", "sensitive", "questionable", "explicit"][i] if i < 4 else f"tag_{i}"
            rows.append(f"{i},{name},{cat},{1000 - i}")
        (path / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return path


def owlv2(path: Path, *, side: int = 64, patch: int = 16, seed: int = 0) -> Path:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from bigasp.text.tokenizer import tokenizer_dir

    torch.manual_seed(seed)
    cfg = Owlv2Config(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": side, "patch_size": patch},
        projection_dim=32,
    )  # fmt: skip
    Owlv2ForObjectDetection(cfg).save_pretrained(path)
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 16
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


def llava(path: Path, *, side: int = 32, patch: int = 8, seed: int = 0, chat_template: bool = True) -> Path:
    """A LLaVA with a tiny Llama and a tiny CLIP vision tower, a word-level tokenizer with a
    Llama-3-style chat template that places the image token in the user turn."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    vocab = {t: i for i, t in enumerate(LLAVA_SPECIAL + LLAVA_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<image>"],
        clean_up_tokenization_spaces=True,  # on, so a decode that keeps the default shows it
    )  # fmt: skip
    if chat_template:
        fast.chat_template = LLAVA_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    n_img = (side // patch) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=side, patch_size=patch),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=vocab["<|eot_id|>"],
                                pad_token_id=vocab["<|finetune_right_pad_id|>"]),
        image_token_index=vocab["<image>"],
        image_seq_length=n_img,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=8,
        bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=vocab["<|eot_id|>"],
        pad_token_id=vocab["<|finetune_right_pad_id|>"],
    )  # fmt: skip
    model.save_pretrained(path)
    return path
