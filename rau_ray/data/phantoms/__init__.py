"""Procedural anatomy phantoms, one generator a module, registered by name.

Each module has NAME, MODALITY, LABELS, OUT_OF_DISTRIBUTION, SUPPORTS_3D and ``generate_2d(seed, subject, size)``
(``ct_abdomen`` also ``generate_3d``). Use: ``PHANTOMS["ct-abdomen"].generate_2d(seed=0, subject=0)``.
"""

from rau_ray.data.phantoms import ct_abdomen, ultrasound, xray_angio, xray_msk
from rau_ray.errors import DataError

PHANTOMS = {m.NAME: m for m in (ct_abdomen, xray_angio, ultrasound, xray_msk)}


def get_phantom(name: str):
    try:
        return PHANTOMS[name]
    except KeyError:
        raise DataError(f"unknown phantom modality {name!r}; choose one of {', '.join(PHANTOMS)}") from None
