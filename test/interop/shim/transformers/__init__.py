"""Stand-in for the `transformers` package, which Debian does not package.

llama.cpp's converters import it for AutoConfig and AutoTokenizer only. AutoConfig
failing makes them read config.json, and the test model ships a SentencePiece
tokenizer.model, which they read with the sentencepiece package: nothing here
computes anything."""


class _Unavailable:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise OSError("transformers is not installed (interop shim): read config.json")


class AutoConfig(_Unavailable):
    pass


class AutoTokenizer(_Unavailable):
    pass
