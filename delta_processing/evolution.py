"""Schema evolution: what silver does with fields a source's contract does not declare.

Pure Polars; no I/O. Modes (per source contract):

* ``add``: each undeclared field becomes a new (string) silver column;
* ``rescue``: undeclared fields go, as a JSON object, into ``_rescued_data``;
* ``fail``: every row of a landing file carrying undeclared fields is quarantined
  with a reason naming them (the sender's batch is kept whole for replay);
* ``freeze``: undeclared fields are dropped, and the rows carrying them counted.

Nothing is dropped silently: every mode either keeps the values or counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from config.contracts import SourceContract

RESCUED_COLUMN = "_rescued_data"
REASON_COLUMN = "_reason"


@dataclass(frozen=True)
class EvolutionOutcome:
    """Typed rows after evolution, rows set aside (mode ``fail``), and affected rows."""

    rows: pl.DataFrame
    rejected: pl.DataFrame
    affected: pl.Series  # _commit_version of every row that carried undeclared values
    added_columns: list[str]

    def affected_since(self, version: int) -> int:
        """Rows carrying undeclared values among bronze versions from ``version`` on."""
        return int((self.affected >= version).sum())


def undeclared_fields(rows: pl.DataFrame, contract: SourceContract) -> list[str]:
    """Raw fields (inside ``_raw``) that the contract does not declare."""
    if "_raw" not in rows.columns:
        return []
    raw_schema = rows.schema["_raw"]
    assert isinstance(raw_schema, pl.Struct)
    declared = {name.lower() for name in contract.field_types}
    return [f.name for f in raw_schema.fields if f.name.lower() not in declared]


def apply_evolution(rows: pl.DataFrame, contract: SourceContract) -> EvolutionOutcome:
    """Apply the contract's evolution mode to typed ``rows`` (which carry ``_raw``)."""
    extra = undeclared_fields(rows, contract)
    values = [pl.col("_raw").struct.field(name) for name in extra]
    carries = pl.any_horizontal([v.is_not_null() for v in values]) if extra else pl.lit(False)
    affected = rows.filter(carries)["_commit_version"] if extra else rows["_commit_version"].clear()
    mode = contract.evolution
    if mode == "add":
        added = rows.with_columns(v.alias(name) for v, name in zip(values, extra, strict=True))
        return EvolutionOutcome(added, rows.clear(), affected, extra)
    if mode == "rescue":
        rescued = (
            pl.when(carries).then(pl.struct(values).struct.json_encode()).otherwise(None)
            if extra
            else pl.lit(None, dtype=pl.String)
        )
        return EvolutionOutcome(rows.with_columns(rescued.alias(RESCUED_COLUMN)), rows.clear(),
                                affected, [])  # fmt: skip
    if mode == "freeze" or not extra:
        return EvolutionOutcome(rows, rows.clear(), affected, [])
    # fail: the whole landing file of any row that carries undeclared fields
    bad_files = rows.filter(carries)["_landing_file"].unique()
    in_bad_file = pl.col("_landing_file").is_in(bad_files.implode())
    set_aside = rows.filter(in_bad_file)
    present = [
        name
        for name, value in zip(extra, values, strict=True)
        if set_aside.select(value.is_not_null().any()).item()
    ]
    reason = (
        f"undeclared field(s) {', '.join(present)} in this landing file "
        "(schema evolution mode 'fail')"
    )
    rejected = set_aside.with_columns(pl.lit(reason).alias(REASON_COLUMN))
    return EvolutionOutcome(rows.filter(~in_bad_file), rejected, affected, [])
