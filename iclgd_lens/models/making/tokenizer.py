"""The word-level tokenizer of the synthetic language of the tiny models.

One token per word: words are split on spaces, and the line separator "\\n" is a token of its
own. BOS is prepended to every text; there is a pad token. It is a fast tokenizer (offset
mappings work, which `tasks.encode_prompts` needs) and round-trips through
`save_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from iclgd_lens.tasks.mapping import SEPARATOR, World

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_tokenizer(
    world: World | None = None, name_or_path: str = "tiny-llama-icl"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary is the specials, "\\n" and the world's words."""
    world = world or World()
    vocab_list = [*SPECIAL_TOKENS, SEPARATOR, *world.words()]
    if len(set(vocab_list)) != len(vocab_list):
        raise ValueError("the world's words must be distinct from each other and from the special tokens")
    vocab = {word: i for i, word in enumerate(vocab_list)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        name_or_path=name_or_path,
        add_bos_token=True,
        padding_side="right",
        model_max_length=256,
    )
