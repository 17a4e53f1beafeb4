"""bildexp: an experiment harness for Big Little Decoder (BiLD) and Predictive Pipelined Decoding (PPD)."""

__version__ = "0.1.0"


class BildexpError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""
