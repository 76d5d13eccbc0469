"""The thesis catalogue's tiers are Table 1's."""

from __future__ import annotations

from scxnn_node.findings import THESIS_CATALOGUE, RiskTier

# Thesis Table 1, read column by column: each tier label heads its first row. The right
# column continues "Urgent" (advanced tuberculosis, atelectasis), then "Non-urgent" (support
# device, pleural calcification, interstitial opacity), then "Cardiomegaly".
TABLE_1 = {
    RiskTier.CRITICAL: [
        "pneumothorax",
        "pneumoperitoneum",
        "mediastinal_widening",
        "pleural_effusion",
    ],
    RiskTier.URGENT: [
        "nodule",
        "consolidation",
        "active_tuberculosis",
        "advanced_tuberculosis",
        "atelectasis",
    ],
    RiskTier.NON_URGENT: ["support_device", "pleural_calcification", "interstitial_opacity"],
    RiskTier.CARDIOMEGALY: ["cardiomegaly"],
}


def test_catalogue_tiers_are_table_1():
    catalogue = {f.name: f.tier for f in THESIS_CATALOGUE}
    expected = {name: tier for tier, names in TABLE_1.items() for name in names}
    assert catalogue == expected


def test_atelectasis_is_urgent():
    assert THESIS_CATALOGUE.get("atelectasis").tier is RiskTier.URGENT


def test_catalogue_order_is_most_urgent_first():
    ranks = [f.tier.rank for f in THESIS_CATALOGUE]
    assert ranks == sorted(ranks)
