"""tiltlm: fine-tune language models toward a target distribution and measure what that does to them."""

__version__ = "0.1.0"
