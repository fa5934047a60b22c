"""t1-linear preprocessing (placeholder exports while in development)."""
from .core import PreprocessingResult, T1LinearSettings, preprocess_t1_linear
from .errors import ERROR_CODES, PreprocessingError
