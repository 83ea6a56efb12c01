"""What an imported model costs: the facts GetImportedModel reports, priced from the config.

Bedrock bills an imported model per Custom Model Unit (CMU) per minute of each active model
copy, in 5-minute windows from the first successful call; the CMU count per copy and the CMU
version (which selects the rate) come from GetImportedModel (docs:
import-model-calculate-cost.html). Every member of that response is optional in the service
model, so each is read with .get().
"""

from __future__ import annotations

from typing import Any

from termtune.aws.clients import RUNTIME_HEADER, stand_in
from termtune.config import CmuPrice


def import_facts(model: dict[str, Any]) -> dict[str, Any]:
    """The GetImportedModel members deploy records, under the response's own names; from termtune
    serve, also what it says of itself (localStandIn, localRuntime): its CMU figure is a placeholder."""
    units = model.get("customModelUnits") or {}
    facts = {"modelArchitecture": model.get("modelArchitecture"),
             "instructSupported": model.get("instructSupported"),
             "customModelUnits": {"customModelUnitsPerModelCopy": units.get("customModelUnitsPerModelCopy"),
                                  "customModelUnitsVersion": units.get("customModelUnitsVersion")},
             "modelKmsKeyArn": model.get("modelKmsKeyArn")}
    if stand_in(model):
        facts.update(localStandIn=stand_in(model), localRuntime=stand_in(model, RUNTIME_HEADER))
    return facts


def estimate(facts: dict[str, Any], region: str, prices: dict[str, dict[str, CmuPrice]]) -> dict[str, Any] | None:
    """One active 5-minute window, an hour of use and a month of storage for one model copy;
    None when the CMU count or a price for this region and CMU version is unknown."""
    units = facts["customModelUnits"]
    count, version = units.get("customModelUnitsPerModelCopy"), units.get("customModelUnitsVersion")
    price = prices.get(region, {}).get(version or "")
    if not isinstance(count, int) or price is None:
        return None
    return {"cmu_per_copy": count, "cmu_version": version, "region": region,
            "usd_per_cmu_minute": price.per_minute,
            "usd_per_5_minute_window": round(count * price.per_minute * 5, 6),
            "usd_per_hour": round(count * price.per_minute * 60, 6),
            "usd_storage_per_month": None if price.storage_per_month is None
            else round(count * price.storage_per_month, 6),
            "price_source": price.source}


def describe(facts: dict[str, Any], cost: dict[str, Any] | None) -> str:
    units = facts["customModelUnits"]
    local = facts.get("localStandIn")
    lines = [f"architecture {facts['modelArchitecture']}, Converse {'yes' if facts['instructSupported'] else 'no'}, "
             f"{units['customModelUnitsPerModelCopy']} CMU per copy ({units['customModelUnitsVersion']})"
             + (" [the stand-in's placeholder figure: Bedrock sizes CMUs from the model]" if local else "")
             + f", model key {facts['modelKmsKeyArn'] or 'AWS owned'}"]
    if cost is None:
        lines.append("cost: no price for this region and CMU version in aws.cmu_prices; see "
                     "https://aws.amazon.com/bedrock/pricing/ (Custom Model Import)")
    else:
        storage = cost["usd_storage_per_month"]
        lines.append(f"cost per active copy: ${cost['usd_per_5_minute_window']:.4f} per 5-minute window, "
                     f"${cost['usd_per_hour']:.2f} per hour of use"
                     + (f"; storage ${storage:.2f} per month until termtune cleanup" if storage is not None else "")
                     + f" (aws.cmu_prices: {cost['price_source']})"
                     + (f"; priced from {local}'s placeholder CMU figure, not a forecast" if local else ""))
    return "\n".join(lines)
