"""Radiation-dose accounting for a procedure (CT) and scan counting (CT and MR).

Units follow CT dose reporting (IEC 60601-2-44) rather than SI, because these are
the numbers the scanner's dose report shows and the physicist audits:
CTDIvol in mGy, DLP in mGy·cm, tube voltage in kV, tube current-time product in
mAs. The scan length is SI (metres) like every other length in the core; it is
only used to cross-check DLP ≈ CTDIvol × length.

The effective dose is an **estimate**: E ≈ k · DLP with a body-region conversion
coefficient k in mSv/(mGy·cm) for a standard adult (AAPM Report 96 / European
Guidelines on Quality Criteria for CT values). It ignores patient size, age and
sex and must not be reported as the patient's organ dose.

MR scans carry no ionising dose but are counted, so the record tells how many
control scans a procedure needed whatever the modality.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping

# Adult DLP-to-effective-dose conversion coefficients, mSv/(mGy·cm).
K_FACTORS_MSV_PER_MGY_CM: Dict[str, float] = {
    'head': 0.0021,
    'head_neck': 0.0031,
    'neck': 0.0059,
    'chest': 0.014,
    'abdomen': 0.015,
    'pelvis': 0.015,
    'abdomen_pelvis': 0.015,
    'trunk': 0.015,
}

CM_PER_M = 100.0  # DLP is reported per centimetre; the scan length is kept in metres

# Plausibility bounds: outside them the number is almost certainly a unit or
# transcription error (e.g. µGy entered as mGy), so it is refused, not stored.
KV_RANGE = (40.0, 160.0)          # diagnostic CT tubes run 70-150 kV
MAX_CTDI_VOL_MGY = 1000.0         # far above any diagnostic protocol (perfusion ≈ 200-500 mGy)
MAX_DLP_MGY_CM = 50000.0
MAX_MAS = 20000.0
MAX_SCAN_LENGTH_M = 2.5
# DLP vs CTDIvol × planned length: over-ranging makes DLP larger; beyond this
# ratio either number is probably wrong, which is flagged (not refused).
DLP_CONSISTENCY_RATIO = (0.5, 2.0)

MODALITY_CT = 'CT'
MODALITY_MR = 'MR'


class DoseValueError(ValueError):
    """A dose figure is missing, not finite, negative or implausible; the message names it."""


def _finite(name: str, value, lo: float = 0.0, hi: float = math.inf, *, allow_zero: bool = True) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise DoseValueError(f'{name} must be a number, got {value!r}') from exc
    if not math.isfinite(f):
        raise DoseValueError(f'{name} must be finite, got {value!r}')
    if f < lo or (not allow_zero and f == 0.0):
        raise DoseValueError(f'{name} must be {">" if not allow_zero else ">="} {lo:g}, got {f:g}')
    if f > hi:
        raise DoseValueError(f'{name} = {f:g} is implausibly large (limit {hi:g}); check the unit')
    return f


def k_factor(body_region: str) -> float:
    """Conversion coefficient k (mSv/(mGy·cm)) for a body region; unknown region -> DoseValueError."""
    key = str(body_region).strip().lower().replace(' ', '_').replace('&', '_').replace('-', '_')
    if key not in K_FACTORS_MSV_PER_MGY_CM:
        raise DoseValueError(f'unknown body region {body_region!r}; expected one of '
                             f'{", ".join(sorted(K_FACTORS_MSV_PER_MGY_CM))}')
    return K_FACTORS_MSV_PER_MGY_CM[key]


# Where a scan's dose figures came from (DoseRecord.msg SOURCE_* values).
SOURCE_RDSR = 'RDSR'                    # an X-Ray Radiation Dose SR sent by the scanner (per irradiation event)
SOURCE_IMAGE_HEADER = 'IMAGE_HEADER'    # CTDIvol (0018,9345), KVP (0018,0060), Exposure (0018,1152) of the images
SOURCE_MANUAL = 'MANUAL'                # typed in by the operator: a flagged fallback
SOURCE_SIMULATED = 'SIMULATED'          # the simulated scanner
SOURCES = (SOURCE_RDSR, SOURCE_IMAGE_HEADER, SOURCE_MANUAL, SOURCE_SIMULATED)


@dataclasses.dataclass(frozen=True)
class DoseFactors:
    """The CT dose factors of one scan or protocol: the one type (and the one validator) for them.

    CTDIvol in mGy, DLP in mGy·cm, tube voltage in kV, tube current-time product in mAs.
    0 means "not reported" (e.g. a scanner state source that does not know the figures); a
    reported figure must be finite, non-negative and plausible (:meth:`problem`). A complete set
    (what the ledger totals) is required by :meth:`require_complete`.
    """

    ctdi_vol_mgy: float = 0.0
    dlp_mgy_cm: float = 0.0
    kv: float = 0.0
    mas: float = 0.0

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise DoseValueError(problem)

    def problem(self) -> str:
        """Why these figures are impossible ('' when each is 0 = not reported, or plausible)."""
        limits = {'ctdi_vol_mgy': MAX_CTDI_VOL_MGY, 'dlp_mgy_cm': MAX_DLP_MGY_CM, 'kv': KV_RANGE[1], 'mas': MAX_MAS}
        for name, high in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f'{name} must be a number, got {value!r}'
            if not math.isfinite(value) or value < 0.0:
                return f'{name} must be finite and >= 0, got {value}'
            if value > high:
                return f'{name} = {value:g} is implausibly large (limit {high:g}); check the unit'
        if 0.0 < self.kv < KV_RANGE[0]:
            return f'kv = {self.kv:g} outside {KV_RANGE[0]:g}..{KV_RANGE[1]:g} kV'
        return ''

    @property
    def reported(self) -> bool:
        """Any figure reported at all."""
        return any((self.ctdi_vol_mgy, self.dlp_mgy_cm, self.kv, self.mas))

    def require_complete(self) -> 'DoseFactors':
        """The figures a CT scan needs to be totalled (kV in range, mAs > 0); DoseValueError otherwise."""
        _finite('kv', self.kv, KV_RANGE[0], KV_RANGE[1])
        _finite('mas', self.mas, 0.0, MAX_MAS, allow_zero=False)
        return self

    def dlp_for_length(self, scan_length_m: float) -> float:
        """DLP (mGy·cm) = CTDIvol × scan length (cm): the figure a scanner reports for a helical range."""
        return self.ctdi_vol_mgy * float(scan_length_m) * CM_PER_M

    def with_dlp(self, scan_length_m: float) -> 'DoseFactors':
        return dataclasses.replace(self, dlp_mgy_cm=self.dlp_for_length(scan_length_m))


@dataclasses.dataclass(frozen=True)
class ScanDose:
    """One scan of the procedure. CT: dose figures required; MR: all dose figures 0.

    ``stamp`` is the time of the scan (s, any consistent clock, e.g. monotonic or epoch).
    ``warnings`` carries non-fatal plausibility findings (e.g. DLP inconsistent with length).
    ``source`` says where the figures came from (SOURCE_*; MANUAL is flagged in ``warnings``).
    """

    scan_id: str
    modality: str
    protocol_name: str = ''
    body_region: str = 'abdomen'
    ctdi_vol_mgy: float = 0.0
    dlp_mgy_cm: float = 0.0
    kv: float = 0.0
    mas: float = 0.0
    scan_length_m: float = 0.0
    stamp: float = 0.0
    warnings: tuple = ()
    source: str = ''
    series_instance_uid: str = ''

    @property
    def is_ionising(self) -> bool:
        return self.modality == MODALITY_CT

    @property
    def factors(self) -> DoseFactors:
        return DoseFactors(self.ctdi_vol_mgy, self.dlp_mgy_cm, self.kv, self.mas)

    @property
    def effective_dose_msv(self) -> float:
        """Estimated effective dose (mSv) = k(region) · DLP; 0 for MR."""
        return k_factor(self.body_region) * self.dlp_mgy_cm if self.is_ionising else 0.0

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['warnings'] = list(self.warnings)
        return d


def ct_scan(scan_id: str, *, ctdi_vol_mgy, dlp_mgy_cm, kv, mas, scan_length_m,
            protocol_name: str = '', body_region: str = 'abdomen', stamp: float = 0.0,
            source: str = '', series_instance_uid: str = '') -> ScanDose:
    """Validate one CT scan's dose figures and return a :class:`ScanDose`.

    Raises DoseValueError for a missing/NaN/negative/implausible value or unknown region.
    """
    scan_id = _scan_id(scan_id)
    k_factor(body_region)  # validates the region
    for name, value in (('ctdi_vol_mgy', ctdi_vol_mgy), ('dlp_mgy_cm', dlp_mgy_cm), ('mas', mas)):
        _finite(name, value)   # a number at all (the message names the field), then the one validator
    _finite('kv', kv, KV_RANGE[0])
    factors = DoseFactors(float(ctdi_vol_mgy), float(dlp_mgy_cm), float(kv), float(mas)).require_complete()
    length = _finite('scan_length_m', scan_length_m, 0.0, MAX_SCAN_LENGTH_M, allow_zero=False)
    stamp_f = _finite('stamp', stamp, -math.inf)
    source = _source(source)
    warnings: List[str] = []
    if source == SOURCE_MANUAL:
        warnings.append('dose figures entered manually (not from the scanner)')
    ctdi, dlp = factors.ctdi_vol_mgy, factors.dlp_mgy_cm
    expected_dlp = factors.dlp_for_length(length)
    if expected_dlp > 0.0:
        ratio = dlp / expected_dlp
        if not (DLP_CONSISTENCY_RATIO[0] <= ratio <= DLP_CONSISTENCY_RATIO[1]):
            warnings.append(f'DLP {dlp:.1f} mGy·cm is {ratio:.2f} × CTDIvol·length '
                            f'({expected_dlp:.1f} mGy·cm); check the reported figures')
    elif dlp > 0.0:
        warnings.append('DLP > 0 with CTDIvol 0')
    return ScanDose(scan_id=scan_id, modality=MODALITY_CT, protocol_name=str(protocol_name),
                    body_region=str(body_region).strip().lower(), ctdi_vol_mgy=ctdi, dlp_mgy_cm=dlp,
                    kv=factors.kv, mas=factors.mas, scan_length_m=length, stamp=stamp_f, warnings=tuple(warnings),
                    source=source, series_instance_uid=str(series_instance_uid or ''))


def _source(source) -> str:
    text = str(source or '').strip().upper()
    if text and text not in SOURCES:
        raise DoseValueError(f'unknown dose source {source!r}; expected one of {", ".join(SOURCES)}')
    return text


def mr_scan(scan_id: str, *, protocol_name: str = '', body_region: str = 'abdomen', stamp: float = 0.0) -> ScanDose:
    """An MR scan: counted, no ionising dose."""
    k_factor(body_region)
    return ScanDose(scan_id=_scan_id(scan_id), modality=MODALITY_MR, protocol_name=str(protocol_name),
                    body_region=str(body_region).strip().lower(), stamp=_finite('stamp', stamp, -math.inf))


def _scan_id(scan_id) -> str:
    text = str(scan_id).strip() if scan_id is not None else ''
    if not text:
        raise DoseValueError('scan_id must be a non-empty string')
    return text


def scan_from_dict(d: Mapping[str, Any]) -> ScanDose:
    """Rebuild (and re-validate) a scan from :meth:`ScanDose.to_dict` (e.g. a record payload)."""
    modality = str(d.get('modality', MODALITY_CT)).upper()
    if modality == MODALITY_MR:
        return mr_scan(d.get('scan_id'), protocol_name=d.get('protocol_name', ''),
                       body_region=d.get('body_region', 'abdomen'), stamp=d.get('stamp', 0.0))
    if modality != MODALITY_CT:
        raise DoseValueError(f'unknown modality {modality!r}; expected CT or MR')
    missing = [k for k in ('ctdi_vol_mgy', 'dlp_mgy_cm', 'kv', 'mas', 'scan_length_m') if k not in d]
    if missing:
        raise DoseValueError(f'CT scan {d.get("scan_id")!r} lacks {", ".join(missing)}')
    return ct_scan(d.get('scan_id'), ctdi_vol_mgy=d['ctdi_vol_mgy'], dlp_mgy_cm=d['dlp_mgy_cm'], kv=d['kv'],
                   mas=d['mas'], scan_length_m=d['scan_length_m'], protocol_name=d.get('protocol_name', ''),
                   body_region=d.get('body_region', 'abdomen'), stamp=d.get('stamp', 0.0),
                   source=d.get('source', ''), series_instance_uid=d.get('series_instance_uid', ''))


@dataclasses.dataclass(frozen=True)
class DoseTotals:
    """Running totals of a procedure (DoseRecord.msg's scan_count/total_dlp_mgy_cm and more)."""

    ct_scan_count: int
    mr_scan_count: int
    total_dlp_mgy_cm: float
    max_ctdi_vol_mgy: float
    effective_dose_msv: float          # estimate: sum of k(region) · DLP
    per_region_dlp_mgy_cm: Dict[str, float]

    @property
    def scan_count(self) -> int:
        return self.ct_scan_count + self.mr_scan_count

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['scan_count'] = self.scan_count
        return d


class DoseLedger:
    """Per-procedure list of scans with totals. Scan ids must be unique (a re-delivered
    scan is refused instead of being counted twice)."""

    def __init__(self, scans: Iterable[ScanDose] = ()):
        self._scans: List[ScanDose] = []
        self._ids = set()
        for s in scans:
            self.add(s)

    def add(self, scan: ScanDose) -> DoseTotals:
        """Add a validated scan; return the totals including it."""
        if not isinstance(scan, ScanDose):
            raise TypeError(f'expected ScanDose, got {type(scan).__name__}')
        if scan.scan_id in self._ids:
            raise DoseValueError(f'scan {scan.scan_id!r} is already in the ledger (counted once only)')
        self._scans.append(scan)
        self._ids.add(scan.scan_id)
        return self.totals()

    def add_ct(self, scan_id: str, **kwargs) -> DoseTotals:
        """Validate and add a CT scan (keyword arguments of :func:`ct_scan`)."""
        return self.add(ct_scan(scan_id, **kwargs))

    def add_mr(self, scan_id: str, **kwargs) -> DoseTotals:
        return self.add(mr_scan(scan_id, **kwargs))

    @property
    def scans(self) -> List[ScanDose]:
        return list(self._scans)

    def totals(self) -> DoseTotals:
        ct = [s for s in self._scans if s.is_ionising]
        per_region: Dict[str, float] = {}
        for s in ct:
            per_region[s.body_region] = per_region.get(s.body_region, 0.0) + s.dlp_mgy_cm
        return DoseTotals(
            ct_scan_count=len(ct),
            mr_scan_count=len(self._scans) - len(ct),
            total_dlp_mgy_cm=math.fsum(s.dlp_mgy_cm for s in ct),
            max_ctdi_vol_mgy=max((s.ctdi_vol_mgy for s in ct), default=0.0),
            effective_dose_msv=math.fsum(s.effective_dose_msv for s in ct),
            per_region_dlp_mgy_cm=per_region,
        )

    def dose_record_fields(self, scan: ScanDose) -> Dict[str, Any]:
        """Fields of DoseRecord.msg (without header) for ``scan`` already in the ledger:
        scan_count/total_dlp count ionising scans up to and including it."""
        if scan.scan_id not in self._ids:
            raise DoseValueError(f'scan {scan.scan_id!r} is not in the ledger')
        upto: List[ScanDose] = []
        for s in self._scans:
            upto.append(s)
            if s.scan_id == scan.scan_id:
                break
        ct = [s for s in upto if s.is_ionising]
        return {'scan_id': scan.scan_id, 'protocol_name': scan.protocol_name,
                'ctdi_vol_mgy': scan.ctdi_vol_mgy, 'dlp_mgy_cm': scan.dlp_mgy_cm, 'kv': scan.kv,
                'mas': scan.mas, 'scan_count': len(ct), 'source': scan.source,
                'series_instance_uid': scan.series_instance_uid,
                'total_dlp_mgy_cm': math.fsum(s.dlp_mgy_cm for s in ct)}

    @classmethod
    def from_payloads(cls, payloads: Iterable[Mapping[str, Any]]) -> 'DoseLedger':
        """Rebuild from stored ``dose`` record payloads (each re-validated)."""
        return cls(scan_from_dict(p) for p in payloads)
