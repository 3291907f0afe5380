"""flax_mnist: a JAX/Flax codebase that trains and compares a family of small MNIST classifiers."""

from flax_mnist.errors import FlaxMnistError

__all__ = ["FlaxMnistError"]
__version__ = "0.1.0"
