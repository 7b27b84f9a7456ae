"""The policy: Qwen2.5-VL with LoRA (peft) and the project's ``<Seg>`` token.

``tiny`` builds a 2-million-parameter Qwen2.5-VL from a config, with a byte-level BPE tokenizer trained in
code on the project's prompt vocabulary, Qwen2.5-VL's special tokens and chat template, saves it with
``save_pretrained`` and loads it back with ``from_pretrained`` — the path the paper profile takes with
``Qwen/Qwen2.5-VL-7B-Instruct``. ``init: pretrained`` (the default) loads the base the project trained on generic
visual-language tasks (``rau pretrain policy``, shipped in ``weights/tiny/qwen2_5_vl`` with its model card);
``init: random`` builds the seeded random model of the same architecture into the cache.
Use: ``policy = load_policy(PolicyConfig()); policy.generate([messages])``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    TokenizersBackend,
)

from rau_ray.config import from_dict
from rau_ray.data.phantoms import PHANTOMS
from rau_ray.data.scenes import KINDS, TONES
from rau_ray.errors import ConfigError
from rau_ray.models import pretrained, prompts

PROJECT_TOKENS = (prompts.SEG_TOKEN,)
# Qwen2.5-VL's added tokens, in its order (the tiny vocabulary gives them ids 0..21)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# Qwen2.5-VL's chat template (same rendering: default system turn, image/video placeholders, add_vision_id,
# generation prompt), written out here because the tiny model has no hub files to copy it from
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PolicyConfig:
    model: str = "tiny"  # "tiny" (built offline), a Hugging Face id, or a local folder
    dtype: str = "float32"  # bfloat16 on GPU for the paper profile
    load_in_4bit: bool = False  # QLoRA-style 4-bit base weights (bitsandbytes, CUDA only)
    lora_rank: int = 8  # swept by Ray Tune; the adapter is the only thing SFT/GRPO train (+ the <Seg> rows)
    lora_alpha: int = 16  # update scale alpha/r: 2 keeps the step size comparable when r is swept
    lora_dropout: float = 0.05  # light regularisation: SFT sets are small (a few thousand reference/target pairs)
    # Linear layers of the *language model* that get LoRA (matched by a regex that excludes the vision tower,
    # whose blocks also have q/k/v-like names): attention only, the usual cheap choice for instruction tuning
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    min_pixels: int = 56 * 56  # processor bounds: images are resized to a multiple of patch_size x 2 px within
    max_pixels: int = 112 * 112  # them; boxes in prompts/answers are pixels of that resized image
    # model == "tiny": "pretrained" loads the shipped base (weights/tiny/qwen2_5_vl, trained by
    # ``rau pretrain policy`` on generic visual-language tasks), "random" a seeded random init built into the cache
    init: str = "pretrained"
    # tiny architecture, used only when model == "tiny": small enough for 2 CPU cores, same code as the 7B, and
    # large enough (2 M parameters) to learn to read images and boxes in its pretraining
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_depth: int = 3
    vision_hidden_size: int = 96
    vision_heads: int = 3
    patch_size: int = 7  # vision patch side (the 7B's 14): with 2x2 merging a 112-px image is 8x8 visual tokens
    # multimodal RoPE base. Its sections are contiguous bands of the head's frequencies, highest to time, lowest to
    # width: at the 7B's 1e6 a 32-wide head gives height/width phases of < 0.01 rad a token, so a tiny model could
    # not tell where an image token lies; at 10 the width band still turns 0.1-0.3 rad a token
    rope_theta: float = 10.0
    vocab_size: int = 1536  # BPE merges learnt from the prompt and scene vocabulary (+ every coordinate 0..448)
    # weight init std of the tiny model. The 7B's 0.02 would leave a 64-wide model's frozen output head able to
    # reach logits of only about +-1, so no LoRA update could push the loss below ~log(vocab); 0.1 lets it peak
    init_std: float = 0.1
    seed: int = 0  # the tiny weights are a function of the config: every worker builds the same model

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"policy.dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        if self.lora_rank < 1:
            raise ConfigError(f"policy.lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_targets:
            raise ConfigError("policy.lora_targets must name at least one Linear layer (e.g. q_proj)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"policy.min_pixels ({self.min_pixels}) must be > 0 and <= max_pixels "
                              f"({self.max_pixels})")
        if self.load_in_4bit and not torch.cuda.is_available():
            raise ConfigError("policy.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on CPU")
        if self.model == pretrained.TINY:
            pretrained.check_init(self.init, "policy")
            if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
                raise ConfigError(f"policy: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                                  f"({self.num_heads}), and num_heads of num_kv_heads ({self.num_kv_heads})")
            if (self.hidden_size // self.num_heads) % 2 or self.hidden_size // self.num_heads < 6:
                raise ConfigError("policy: the head size hidden_size/num_heads must be even and >= 6 "
                                  "(multimodal RoPE splits half of it into time/height/width sections)")
            if self.vision_hidden_size % self.vision_heads:
                raise ConfigError(f"policy: vision_hidden_size ({self.vision_hidden_size}) must be a multiple of "
                                  f"vision_heads ({self.vision_heads})")


TINY = PolicyConfig()
PAPER = PolicyConfig(model="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", lora_rank=16, lora_alpha=32,
                     min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)


MAX_COORD_TOKEN = 448  # every integer 0..448 (a box coordinate of any frame within max_pixels) is one token
# the words of the generic scene tasks the tiny base is pretrained on (rau_ray.train.pretrain_policy)
SCENE_WORDS = ("I see There is are a an the one two three four five shape shapes from left to right top bottom "
               "middle centre on at in of and Image image 1 2 Where Which where which Describe describe "
               "further higher up lower larger smaller so it its is centred x y px across wide does box "
               "fall holds lies compared with than")


def _tiny_corpus() -> list[str]:
    names = [n for m in PHANTOMS.values() for n in m.LABELS.values()]
    example = {n: [10 * i, 20 + i, 30 + 10 * i, 90 + i] for i, n in enumerate(names)}
    text = [prompts.SYSTEM_PROMPT, *prompts.QUESTIONS.values(), json.dumps(example),
            " ".join(str(i) for i in range(0, 1100)), "Reference CT MR XA US DX image: Target structures",
            "is left right above below anterior posterior medial lateral of the next to near between"]
    for task in prompts.TASKS:
        for n in names:
            text.append(prompts.build_answer(task, label=n, box=example[n], boxes=example,
                                             think=f"The {n} lies left of and above the next structure."))
    # coordinates as single tokens, with and without the leading space (JSON boxes: "[12, 40, ...]"), and the scene
    # vocabulary: enough repeats that BPE merges all of them before rarer words
    numbers = " ".join(f"[{i}, {i}]" for i in range(MAX_COORD_TOKEN + 1))
    shapes = [f"{tone} {kind}" for tone in TONES for kind in KINDS]
    scene = [numbers, " ".join(shapes), SCENE_WORDS, "system user assistant You are a helpful assistant.",
             json.dumps({"answer": "image 1"}), json.dumps({"answer": "image 2"}),
             json.dumps({"boxes": [{"label": n, "box": [0, 0, 1, 1]} for n in shapes]})]
    return text * 3 + scene * 24


@functools.lru_cache(maxsize=1)
def corpus_digest() -> str:
    """Identifies the tiny tokenizer: its merges are learnt from ``_tiny_corpus``."""
    return hashlib.sha256(json.dumps(_tiny_corpus()).encode()).hexdigest()[:16]


ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vision_depth",
               "vision_hidden_size", "vision_heads", "patch_size", "rope_theta", "vocab_size")


def tiny_spec(cfg: PolicyConfig) -> dict:
    """The tiny base a config asks for: its architecture and tokenizer (and, for ``init: random``, the seeded init
    and the processor's pixel bounds it is saved with), the key of ``pretrained.resolve``. The shipped pretrained
    folder holds the ``init: pretrained`` spec in ``rau_tiny_spec.json``."""
    spec = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    spec.update(model=cfg.model, special_tokens=list(QWEN_SPECIAL), chat_template=CHAT_TEMPLATE,
                tokenizer=corpus_digest(), number_rows="fourier-16")
    if cfg.init != "pretrained":
        spec.update(init_std=cfg.init_std, seed=cfg.seed, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return spec


def number_tokens(tokenizer) -> dict[int, int]:
    """Token id -> integer value for the coordinate tokens 0..MAX_COORD_TOKEN, with and without a leading space
    (a JSON box's first number follows "[", the others ", ")."""
    out = {}
    for token, i in tokenizer.get_vocab().items():
        text = token[1:] if token.startswith("\u0120") else token  # "\u0120": byte-level BPE's space
        if text.isascii() and text.isdigit() and str(int(text)) == text and int(text) <= MAX_COORD_TOKEN:
            out[i] = int(text)
    return out


@torch.no_grad()
def _number_rows(model, tokenizer) -> None:
    """Numbers start as smooth functions of their value: each coordinate token's input and output rows are Fourier
    features of the number (periods 8..1024 px) in a random subspace, plus a little noise, so nearby values start
    near each other and what a model learns for 40 carries over to 41 (a random init makes every number its own
    class). Both spellings of a number (with or without a leading space) share the features."""
    numbers = number_tokens(tokenizer)
    if not numbers:
        return
    ids = torch.tensor(list(numbers))
    values = torch.tensor(list(numbers.values()), dtype=torch.float32)
    periods = torch.logspace(3, 10, 16, base=2.0)
    angle = 2 * torch.pi * values[:, None] / periods[None]
    features = torch.cat([angle.sin(), angle.cos()], 1) / 4.0  # unit norm
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        std = float(weight.std())
        basis = torch.linalg.qr(torch.randn(weight.shape[1], features.shape[1]))[0]  # orthonormal columns
        smooth = features @ basis.T * std * weight.shape[1] ** 0.5
        weight[ids] = (0.8 * smooth + 0.2 * weight[ids]).to(weight.dtype)


def _save_tiny(cfg: PolicyConfig, folder: Path) -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tiny_corpus(), trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=list(QWEN_SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # the generic fast tokenizer keeps this BPE's own byte-level pre-tokenizer (saved in tokenizer.json):
    # Qwen2Tokenizer would replace it with Qwen's, which splits every number into digits; here each coordinate
    # 0..448 is one token, which a model this small learns boxes with far better
    tok = TokenizersBackend(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token=None, bos_token=None)
    bounds = {"size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
              "patch_size": cfg.patch_size, "merge_size": 2}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**bounds), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**bounds), chat_template=CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = cfg.hidden_size // cfg.num_heads
    half = head_dim // 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": 4096,
            # multimodal RoPE: the rotary half of a head is split into (time, height, width) sections
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                "mrope_section": [half - 2 * (half * 7 // 16), half * 7 // 16, half * 7 // 16]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False,
            "initializer_range": cfg.init_std},
        vision_config={"depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden_size,
                       "intermediate_size": 2 * cfg.vision_hidden_size, "num_heads": cfg.vision_heads,
                       "out_hidden_size": cfg.hidden_size, "fullatt_block_indexes": [cfg.vision_depth - 1],
                       # one attention window covers a whole 112-px image (8x8 merged tokens)
                       "window_size": 8 * cfg.patch_size * 2, "patch_size": cfg.patch_size,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, initializer_range=cfg.init_std)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _number_rows(model, tok)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    pretrained.save_tiny_weights(model, folder)
    processor.save_pretrained(folder)


def _load_base(cfg: PolicyConfig, processor_source: str | Path | None = None):
    cfg.validate()
    path = pretrained.resolve(cfg.model, "policy", lambda folder: _save_tiny(cfg, folder), tiny_spec(cfg),
                              init=cfg.init)
    kwargs = {"dtype": DTYPES[cfg.dtype]}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=DTYPES[cfg.dtype])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    processor = AutoProcessor.from_pretrained(path if processor_source is None else processor_source)
    # the config decides the pixel bounds (the hub's default goes up to 12.8 Mpx per image)
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    return model, processor


def _add_project_tokens(model, processor) -> int:
    tok = processor.tokenizer
    new = [t for t in PROJECT_TOKENS if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    # Qwen2.5-VL-7B's embedding matrix is padded (152064 rows for 151665 tokens): <Seg> then takes a spare row
    # and nothing is resized; the tiny one has exactly len(tok) rows and grows by one.
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    tok.padding_side = "left"  # batched generation continues every row from its last prompt token
    seg_id = tok.convert_tokens_to_ids(prompts.SEG_TOKEN)
    if new:  # start <Seg> at the mean of the known rows (deterministic); a saved adapter carries its trained rows
        with torch.no_grad():
            for weight in {id(w): w for w in (model.get_input_embeddings().weight,
                                              model.get_output_embeddings().weight)}.values():
                weight[seg_id] = weight[:len(tok) - len(new)].float().mean(0).to(weight.dtype)
    return seg_id


def _lora_config(cfg: PolicyConfig, seg_id: int, tied: bool):
    targets = "|".join(cfg.lora_targets)
    # peft's trainable tokens: only the <Seg> row of the input embedding (and of the output head, so the policy
    # can learn to *emit* <Seg>) trains, as a small delta saved with the adapter; the rest of the vocabulary stays
    # frozen. With tied embeddings peft updates lm_head through embed_tokens, so it is named only when untied.
    rows = {"embed_tokens": [seg_id]} if tied else {"embed_tokens": [seg_id], "lm_head": [seg_id]}
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=rf".*language_model.*\.({targets})",  # not the vision tower
                      trainable_token_indices=rows)


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


class Policy:
    """A peft-wrapped Qwen2.5-VL with its processor; built by ``load_policy`` or ``Policy.load``."""

    def __init__(self, model, processor, cfg: PolicyConfig):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.tokenizer = processor.tokenizer
        self.seg_token_id = self.tokenizer.convert_tokens_to_ids(prompts.SEG_TOKEN)
        self._assistant_ids = self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self._stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}  # <|im_end|>, <|endoftext|>
        # chat/vision special tokens are dropped from completions; <Seg> is special too, but it is the answer
        self._hidden_ids = {i for i, t in self.tokenizer.added_tokens_decoder.items()
                            if t.special and i != self.seg_token_id}

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs_for(self, messages_batch: list[list[dict]], completions: list[str] | None = None):
        """Processor inputs for a batch; with completions, ``labels`` are -100 except on the completion tokens."""
        texts, images = [], []
        for i, messages in enumerate(messages_batch):
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if completions is not None:
                text += completions[i] + "<|im_end|>"
            texts.append(text)
            images += [c["image"] for m in messages if isinstance(m["content"], list) for c in m["content"]
                       if c["type"] == "image"]
        # keeps mm_token_type_ids: transformers 5 needs them to give image tokens 3D (t, h, w) rotary positions
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        if completions is not None:
            labels = inputs["input_ids"].clone()
            labels[inputs["attention_mask"] == 0] = -100
            for row in range(labels.shape[0]):
                start = self._completion_start(inputs["input_ids"][row])
                labels[row, :start] = -100
            inputs["labels"] = labels
        return inputs.to(self.device)

    def _completion_start(self, ids: torch.Tensor) -> int:
        """Index of the first token after the last ``<|im_start|>assistant\\n`` in ``ids``."""
        pattern = torch.tensor(self._assistant_ids, device=ids.device)
        hits = (ids.unfold(0, len(pattern), 1) == pattern).all(1).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError("no assistant turn in the input")
        return int(hits[-1]) + len(pattern)

    @torch.no_grad()
    def generate(self, messages_batch: list[list[dict]], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, synced_gpus: bool | None = None) -> list[str]:
        """Completions for a batch of chats (greedy unless ``do_sample``); LoRA dropout is off while generating.

        ``synced_gpus``: keep every rank stepping until all are done, as a ZeRO-3-sharded model needs."""
        inputs = self.inputs_for(messages_batch)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus, **sampling)
        finally:
            self.model.train(training)
        return [self.decode_completion(row) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]

    def decode_completion(self, ids: list[int]) -> str:
        """Generated ids -> text: up to the first <|im_end|>/<|endoftext|>, chat tokens dropped, <Seg> kept."""
        stop = next((i for i, t in enumerate(ids) if t in self._stop_ids), len(ids))
        return self.tokenizer.decode([t for t in ids[:stop] if t not in self._hidden_ids])

    def seg_hidden_states(self, messages: list[dict], completion: str) -> torch.Tensor:
        """Last-layer hidden states at the completion's ``<Seg>`` tokens: (n_seg, hidden)."""
        inputs = self.inputs_for([messages], [completion])
        inputs.pop("labels")
        out = self.model(**inputs, output_hidden_states=True)
        ids = inputs["input_ids"][0]
        start = self._completion_start(ids)
        positions = (ids == self.seg_token_id).nonzero().flatten()
        return out.hidden_states[-1][0, positions[positions >= start]]

    def parameter_counts(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {"total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}

    def save(self, folder: str | Path) -> Path:
        """peft adapter (safetensors, with the <Seg> rows), processor + tokenizer with the added token, config."""
        folder = Path(folder)
        self.model.save_pretrained(folder / "adapter")
        self.processor.save_pretrained(folder / "processor")
        (folder / "policy_config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, trainable: bool = False) -> Policy:
        """The base named in the saved config (rebuilt/found via ``resolve``) + the saved processor and adapter."""
        folder = Path(folder)
        saved = json.loads((folder / "policy_config.json").read_text())
        saved.setdefault("init", "random")  # saved before the pretrained base existed: trained on a random one
        cfg = from_dict(PolicyConfig, saved, str(folder))
        model, processor = _load_base(cfg, processor_source=folder / "processor")
        _add_project_tokens(model, processor)  # the saved tokenizer has <Seg> already: this only sizes the rows
        model = PeftModel.from_pretrained(model, folder / "adapter", is_trainable=trainable)
        return cls(model, processor, cfg)


def load_policy(cfg: PolicyConfig = TINY) -> Policy:
    """Base model + processor (tiny or real), the <Seg> token with resized embeddings, a fresh LoRA adapter."""
    model, processor = _load_base(cfg)
    seg_id = _add_project_tokens(model, processor)
    model = get_peft_model(model, _lora_config(cfg, seg_id, _tied(model)))
    return Policy(model, processor, cfg)
