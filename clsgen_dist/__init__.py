"""clsgen-dist: CLSGen dual-head fine-tuning (classification probability + verbalized explanation)."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package stays cheap
    if name == "CLSGen":
        from .predict import CLSGen

        return CLSGen
    raise AttributeError(name)


__all__ = ["CLSGen", "__version__"]
