"""JoyCaption captions, as bigASP's caption-images.py made them (LLaVA through transformers).

Image: a Lanczos squish to the vision tower's side (384 for JoyCaption's SigLIP), /255,
mean 0.5 / std 0.5. Text: the prompt set's system message and the drawn user prompt through
the tokenizer's chat template with the generation prompt, tokenized without special tokens,
the image token expanded to `image_seq_length` copies. One prompt per batch, so every row has
the same length and needs no padding. Sampling settings (temperature, top-p) come from the
model's generation config. Decoding is bigASP's too (`decode_captions`): no clean-up of
tokenization spaces, every special token kept except `<|eot_id|>` and the padding token
`<|finetune_right_pad_id|>`, which are removed from the text, then surrounding whitespace
stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp.annotate.models import dtype_kwargs, local_folder, model_key, torch_dtype
from bigasp.annotate.prompts import PromptSet, load_prompt_set
from bigasp.annotate.provenance import model_provenance
from bigasp.errors import ConfigError, ModelLoadError

# bigASP's caption-images.py removed exactly these from the decoded text (end of turn, padding)
REMOVED_TOKENS = ("<|eot_id|>", "<|finetune_right_pad_id|>")


def decode_captions(tokenizer, ids) -> list[str]:
    """Generated ids (prompt trimmed off) -> captions, decoded as bigASP's caption-images.py did:
    `batch_decode(skip_special_tokens=False, clean_up_tokenization_spaces=False)`, then the
    end-of-turn and padding tokens removed and the text stripped. Leaving the tokenizer's own
    defaults would clean up spaces (" 's" -> "'s", " ," -> ",") and drop other special tokens,
    so the captions would differ from a bigASP-made dataset's."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out = []
    for text in texts:
        for token in REMOVED_TOKENS:
            text = text.replace(token, "")
        out.append(text.strip())
    return out


@dataclass
class CaptionPrepare:
    """Worker side: Lanczos squish to side x side, uint8 [side, side, 3] (no padding)."""

    side: int

    def __call__(self, im: Image.Image) -> np.ndarray:
        if im.size != (self.side, self.side):
            im = im.resize((self.side, self.side), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _chat_templates(path: Path, tokenizer) -> list[str]:
    """The tokenizer's chat template, then the processor's (chat_template.jinja / .json)."""
    out = [tokenizer.chat_template] if getattr(tokenizer, "chat_template", None) else []
    for name in ("chat_template.jinja", "chat_template.json"):
        p = path / name
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            out.append(json.loads(text)["chat_template"] if name.endswith(".json") else text)
    if not out:
        raise ModelLoadError(
            f"{path}: the caption model has no chat template (tokenizer_config.json 'chat_template', "
            "chat_template.jinja or chat_template.json); JoyCaption folders ship one"
        )
    return out


class JoyCaption:
    stage = "caption"

    def __init__(self, cfg, device):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        path = local_folder(cfg.model, "caption", ("config.json",))
        self.prompts: PromptSet = load_prompt_set(cfg.prompt_set)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the tokenizer of {path}: {err}") from None
        self.templates = _chat_templates(path, self.tokenizer)
        self.template = self.templates[0]
        self.dtype = torch_dtype(cfg.dtype)
        self.cfg = cfg
        self.device = device
        self.key = model_key(path, cfg.key)
        self.backend = cfg.backend
        if cfg.backend == "vllm":
            self._init_vllm(path)
        else:
            try:
                self.model = LlavaForConditionalGeneration.from_pretrained(
                    str(path), local_files_only=True, **dtype_kwargs(self.dtype)
                )
            except (OSError, ValueError) as err:
                raise ModelLoadError(f"could not load the LLaVA folder {path}: {err}") from None
            self.model = self.model.to(device, self.dtype).eval()
            conf = self.model.config
            self.image_token_id = int(getattr(conf, "image_token_id", None) or conf.image_token_index)
            self.image_seq_length = int(conf.image_seq_length)
            self.input_side = int(conf.vision_config.image_size)
            self.template = self._template_with_image(path)
        self.prepare = CaptionPrepare(self.input_side)
        self.schema = pa.schema(
            [
                pa.field("caption", pa.string()),
                pa.field("caption_type", pa.string()),
                pa.field("prompt", pa.string()),
            ]
        )
        gen = getattr(getattr(self, "model", None), "generation_config", None)
        self._provenance = model_provenance(
            path,
            stage="caption",
            model_key=self.key,
            settings={
                "prompt_set": self.prompts.name,
                "system": self.prompts.system,
                "max_new_tokens": cfg.max_new_tokens,
                "do_sample": cfg.do_sample,
                "temperature": getattr(gen, "temperature", None),
                "top_p": getattr(gen, "top_p", None),
                "input_side": self.input_side,
                "backend": cfg.backend,
                "dtype": cfg.dtype,
            },
        )

    @property
    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def _template_with_image(self, path: Path) -> str:
        """The first chat template that places the image token in the user turn (checked once, at load)."""
        token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        for template in self.templates:
            self.template = template
            if token in self.conversation_text("Describe this image."):
                return template
        raise ModelLoadError(
            f"{path}: no chat template of the caption model places the image token {token!r} "
            f"(id {self.image_token_id}) in the user turn"
        )

    def conversation_text(self, prompt: str) -> str:
        convo = [{"role": "system", "content": self.prompts.system}, {"role": "user", "content": prompt}]
        kw = {"tokenize": False, "add_generation_prompt": True, "chat_template": self.template}
        return self.tokenizer.apply_chat_template(convo, **kw)

    def input_ids(self, prompt: str) -> list[int]:
        """The chat tokens with the image token expanded to image_seq_length copies (bigASP)."""
        tokens = self.tokenizer.encode(self.conversation_text(prompt), add_special_tokens=False)
        if self.image_token_id not in tokens:
            raise ModelLoadError(
                "the caption model's chat template does not place the image token "
                f"(id {self.image_token_id}) in the user turn"
            )
        out: list[int] = []
        for t in tokens:
            out.extend([t] * self.image_seq_length if t == self.image_token_id else [t])
        return out

    def pixel_values(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return ((x - 0.5) / 0.5).to(self.dtype)

    def generate(self, batch: np.ndarray, prompt: str, seed: int) -> list[str]:
        import torch

        if self.backend == "vllm":
            return self._generate_vllm(batch, prompt, seed)
        ids = torch.tensor([self.input_ids(prompt)] * len(batch), device=self.device)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                pixel_values=self.pixel_values(batch),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=self.cfg.do_sample,
                suppress_tokens=None,
                use_cache=True,
            )
        return decode_captions(self.tokenizer, out[:, ids.shape[1] :])

    def _init_vllm(self, path: Path) -> None:
        """vLLM engine (GPU only). Its own processor builds the image input from the PIL squish."""
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ConfigError(
                "caption.backend = 'vllm' but vllm is not installed; pip install vllm"
            ) from None
        conf = json.loads((path / "config.json").read_text())
        self.input_side = int(conf.get("vision_config", {}).get("image_size", 384))
        self.llm = LLM(model=str(path), dtype=self.cfg.dtype.replace("bf16", "bfloat16").replace("fp", "float"),
                       enable_prefix_caching=True, max_model_len=4096)  # fmt: skip
        gen = (
            json.loads((path / "generation_config.json").read_text())
            if (path / "generation_config.json").is_file()
            else {}
        )
        self._sampling = lambda seed: SamplingParams(
            temperature=gen.get("temperature", 0.6) if self.cfg.do_sample else 0.0,
            top_p=gen.get("top_p", 0.9),
            max_tokens=self.cfg.max_new_tokens,
            seed=seed,
            skip_special_tokens=False,  # decoded as bigASP did (see decode_captions)
            spaces_between_special_tokens=False,
        )

    def _generate_vllm(self, batch: np.ndarray, prompt: str, seed: int) -> list[str]:
        convo = [
            {"role": "system", "content": self.prompts.system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        ]
        text = self.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.template)  # fmt: skip
        reqs = [{"prompt": text, "multi_modal_data": {"image": Image.fromarray(a)}} for a in batch]
        outs = self.llm.generate(reqs, self._sampling(seed), use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        for token in REMOVED_TOKENS:
            texts = [t.replace(token, "") for t in texts]
        return [t.strip() for t in texts]

    def table(self, ids: list[str], rows: list[dict[str, Any]]) -> pa.Table:
        from bigasp.annotate.tags import _rows_table

        return _rows_table(ids, rows, self.schema)
