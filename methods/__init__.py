"""Built-in methods; importing this package registers each of them."""

from methods import full, random_subset  # noqa: F401
from methods import coresets, dealrec, goracs  # noqa: F401
from methods import foster  # noqa: F401
from methods import farzi, td3  # noqa: F401
