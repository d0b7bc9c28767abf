"""projects.pii: each detector on real positives and on the look-alikes that technical documents
are full of, span boundaries, overlaps, normalisation, redaction, and the spaCy NER path with a
real (tiny) pipeline. No database: pii is Django-free."""

from __future__ import annotations

from pathlib import Path

import pytest

from projects import pii


@pytest.fixture(scope="module")
def detector() -> pii.Detector:
    return pii.Detector(known_names=["Ada Lovelace", "Jan", "Grace Brewster Hopper"])


def found(detector: pii.Detector, text: str, type_: str | None = None) -> list[str]:
    return [s.text for s in detector.detect(text) if type_ is None or s.type == type_]


# ---------------------------------------------------------------------------------------------
# Payment cards, IBANs, SSNs


@pytest.mark.parametrize(
    "card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500000000000004", "3782 822463 10005"]
)
def test_card_numbers_passing_luhn_are_found(detector: pii.Detector, card: str) -> None:
    assert found(detector, f"Charged to {card} yesterday.") == [card]
    assert detector.detect(f"Charged to {card} yesterday.")[0].type == "CREDIT_CARD"


@pytest.mark.parametrize("number", ["4111111111111112", "4111 1111 1111 1113", "1234567812345678"])
def test_sixteen_digits_failing_luhn_are_not_a_card(detector: pii.Detector, number: str) -> None:
    assert found(detector, f"Tracking number {number} shipped.", "CREDIT_CARD") == []


@pytest.mark.parametrize(
    "iban",
    [
        "GB82 WEST 1234 5698 7654 32",
        "DE89370400440532013000",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
        "ES9121000418450200051332",
    ],
)
def test_ibans_with_a_valid_checksum_are_found(detector: pii.Detector, iban: str) -> None:
    spans = detector.detect(f"Pay into {iban} by Friday.")
    assert [(s.type, s.text) for s in spans] == [("IBAN", iban)]


@pytest.mark.parametrize("iban", ["GB82WEST12345698765433", "DE89370400440532013001", "NL92ABNA0417164300"])
def test_an_iban_with_a_wrong_checksum_is_not_an_iban(detector: pii.Detector, iban: str) -> None:
    assert found(detector, f"Pay into {iban} by Friday.", "IBAN") == []


@pytest.mark.parametrize("ssn", ["536-90-4123", "212-67-8391", "536 90 4123"])
def test_ssns_are_found(detector: pii.Detector, ssn: str) -> None:
    assert [(s.type, s.text) for s in detector.detect(f"Her SSN is {ssn}.")] == [("US_SSN", ssn)]


@pytest.mark.parametrize(
    "ssn",
    [
        "000-12-3456",  # area 000 never issued
        "666-12-3456",  # area 666 never issued
        "900-12-3456",  # 9xx are ITINs, not SSNs
        "987-65-4321",
        "078-05-1120",  # the Woolworth wallet card
        "219-09-9999",  # printed in an SSA pamphlet
        "123-00-4567",  # group 00
        "123-45-0000",  # serial 0000
    ],
)
def test_ssns_in_invalid_ranges_are_not_ssns(detector: pii.Detector, ssn: str) -> None:
    # Nor are they phone numbers: 3-2-4 digits with dashes is the SSN's shape, not a phone's.
    assert detector.detect(f"The number {ssn} was on the form.") == []


# ---------------------------------------------------------------------------------------------
# IP addresses


@pytest.mark.parametrize(
    "ip", ["192.168.1.20", "10.0.0.1", "8.8.8.8", "2001:db8::ff00:42:8329", "fe80::1", "::1", "10.0.0.0/8"]
)
def test_ip_addresses_are_found(detector: pii.Detector, ip: str) -> None:
    assert [(s.type, s.text) for s in detector.detect(f"The host {ip} answered.")] == [("IP_ADDRESS", ip)]


def test_ip_addresses_at_the_end_of_a_sentence_and_in_a_hosts_table(detector: pii.Detector) -> None:
    assert found(detector, "The server is 10.0.0.1. Then", "IP_ADDRESS") == ["10.0.0.1"]
    assert found(detector, "Hosts:\n10.1.2.3 web\n10.1.2.4 db", "IP_ADDRESS") == ["10.1.2.3", "10.1.2.4"]
    assert found(detector, "Connect to 10.0.0.1:5432 now", "IP_ADDRESS") == ["10.0.0.1"]


@pytest.mark.parametrize(
    "text",
    [
        "Upgrade to version 1.2.3.4 now.",
        "It needs release 10.0.0.1-rc or later.",
        "Built from libfoo-1.2.3.4 sources.",
        "The 1.2.3.4.5 tag is old.",
        "Use 2.0.1.3+dfsg1 from unstable.",
        "Kernel 4.19.0.17 is fixed.",
        "See Section 8.1.6.1, above.",
        "#### 8.1.6.1. dpkg-deb\n\nThis program",
        "8.1.6.1. dpkg-deb manipulates archives",
        "#### 12.2.1.1 What is the code of conduct",
        "Call std::vector or a::b or cafe::face here.",
    ],
)
def test_version_and_section_numbers_and_scopes_are_not_ips(detector: pii.Detector, text: str) -> None:
    assert found(detector, text, "IP_ADDRESS") == []


# ---------------------------------------------------------------------------------------------
# Phones and e-mail


@pytest.mark.parametrize(
    "phone",
    [
        "+1 415-555-2671",
        "(415) 555-2671",
        "+44 20 7946 0958",
        "020 7946 0958",
        "+49 30 901820",
        "+33 1 42 68 53 00",
    ],
)
def test_phone_numbers_are_found(detector: pii.Detector, phone: str) -> None:
    assert [(s.type, s.text) for s in detector.detect(f"Ring {phone} today.")] == [("PHONE", phone)]


def test_bare_digits_are_a_phone_only_after_a_phone_word(detector: pii.Detector) -> None:
    assert found(detector, "Call 4155552671 after six.", "PHONE") == ["4155552671"]
    assert found(detector, "Tel.: 4155552671", "PHONE") == ["4155552671"]
    assert found(detector, "Order 4155552671 was shipped.", "PHONE") == []
    assert found(detector, "Order #4155552671 was shipped.", "PHONE") == []
    assert found(detector, "The timestamp 1712345678 is UTC.", "PHONE") == []


@pytest.mark.parametrize(
    "text",
    [
        "Released on 30.05.2021 in Berlin.",
        "Released on 12/05/2021 in Boston.",
        "Released on 2021-05-12.",
        "Build 20210512 passed.",
        "Version 4.15.0-1234 is out.",
        "ISBN 978-3-16-148410-0 is the book.",
    ],
)
def test_dates_builds_and_versions_are_not_phones(detector: pii.Detector, text: str) -> None:
    assert found(detector, text, "PHONE") == []


def test_email_addresses_are_found_whole(detector: pii.Detector) -> None:
    text = "Write to Ada.Lovelace+faq@Example.CO.UK, or <listmaster@lists.debian.org>."
    assert found(detector, text, "EMAIL") == ["Ada.Lovelace+faq@Example.CO.UK", "listmaster@lists.debian.org"]
    assert found(detector, "Use @decorator and user@localhost and a@b", "EMAIL") == []


# ---------------------------------------------------------------------------------------------
# Secrets


@pytest.mark.parametrize(
    ("secret", "plugin"),
    [
        ("AKIAIOSFODNN7EXAMPLE", "AWS Access Key"),
        ("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", "GitHub Token"),
        ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "Slack Token"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "Stripe Access Key"),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0"
            "IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
            "JSON Web Token",
        ),
    ],
)
def test_tokens_are_found_whole(detector: pii.Detector, secret: str, plugin: str) -> None:
    spans = detector.detect(f"export TOKEN={secret} # rotate")
    assert [(s.type, s.text, s.detector) for s in spans] == [("SECRET", secret, f"detect-secrets: {plugin}")]


def test_a_private_key_is_the_whole_block(detector: pii.Detector) -> None:
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234\nq0Xk+abcd==\n-----END RSA PRIVATE KEY-----"
    text = f"Put this in ~/.ssh/id_rsa:\n{key}\nThen chmod 600."
    assert [(s.type, s.text) for s in detector.detect(text)] == [("SECRET", key)]


@pytest.mark.parametrize(
    "text",
    [
        "The commit 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12 fixed it.",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 is empty.",
        "Set password: see below, and the token in your settings.",
        "The AKIA prefix marks AWS keys; ghp_ marks GitHub tokens.",
        "A UUID 123e4567-e89b-12d3-a456-426614174000 identifies it.",
    ],
)
def test_ordinary_words_and_hashes_are_not_secrets(detector: pii.Detector, text: str) -> None:
    assert detector.detect(text) == []


def test_url_credentials_leave_the_host_out(detector: pii.Detector) -> None:
    text = "DATABASE_URL=postgres://admin:s3cr3t@db.example.org:5432/app and https://user:pa55@example.com/x"
    spans = detector.detect(text)
    assert [(s.type, s.text) for s in spans] == [
        ("URL_CREDENTIALS", "admin:s3cr3t"),
        ("URL_CREDENTIALS", "user:pa55"),
    ]
    assert "db.example.org" in pii.redact(text, [(s.start, s.end, "[URL_CREDENTIALS]") for s in spans])
    assert detector.detect("Pages: https://example.com/wiki/a:b@c.html") == []


def test_an_ssh_remote_is_not_an_email(detector: pii.Detector) -> None:
    assert detector.detect("Clone git@salsa.debian.org:ddp-team/debian-faq.git today.") == []
    assert found(detector, "Mail git@salsa.debian.org: it is read.", "EMAIL") == ["git@salsa.debian.org"]


# ---------------------------------------------------------------------------------------------
# Names: the list, and a real spaCy pipeline


def test_known_names_case_insensitive_and_across_a_line_break(detector: pii.Detector) -> None:
    text = "Written by ada\nlovelace and ADA LOVELACE; reviewed by Grace  Brewster\tHopper."
    assert found(detector, text, "PERSON") == ["ada\nlovelace", "ADA LOVELACE", "Grace  Brewster\tHopper"]


def test_a_known_name_is_not_found_inside_another_word(detector: pii.Detector) -> None:
    assert found(detector, "Janet and Jansen met in January, then Jan left.", "PERSON") == ["Jan"]
    assert found(detector, "Use ada_lovelace or AdaLovelace as ids.", "PERSON") == []


def test_no_names_without_a_list_or_a_model() -> None:
    plain = pii.Detector()
    assert plain.finds_names == "not at all"
    assert found(plain, "Ada Lovelace wrote it.", "PERSON") == []


@pytest.fixture(scope="module")
def tiny_ner(tmp_path_factory: pytest.TempPathFactory) -> str:
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": [{"LOWER": "linus"}, {"LOWER": "torvalds"}]},
            {"label": "PERSON", "pattern": "Ian Murdock"},
            {"label": "ORG", "pattern": "Debian"},
        ]
    )
    folder: Path = tmp_path_factory.mktemp("ner")
    nlp.to_disk(folder)
    return str(folder)


def test_spacy_ner_path_with_a_real_pipeline(tiny_ner: str) -> None:
    with_model = pii.Detector(known_names=["Bruce Perens"], ner_model=tiny_ner)
    text = "Ian Murdock founded Debian; Linus Torvalds wrote Linux; Bruce Perens led it."
    spans = with_model.detect(text)
    assert [(s.type, s.text, s.detector.split(":")[0]) for s in spans] == [
        ("PERSON", "Ian Murdock", "spaCy"),
        ("PERSON", "Linus Torvalds", "spaCy"),
        ("PERSON", "Bruce Perens", "your name list"),
    ]
    assert with_model.finds_names == f"by the name-recognition model {tiny_ner} and your list"


def test_a_missing_or_entityless_model_fails_at_construction(tmp_path: Path) -> None:
    import spacy

    with pytest.raises(pii.NerUnavailable, match="could not be loaded"):
        pii.Detector(ner_model=str(tmp_path / "nothing-here"))
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(pii.NerUnavailable, match="recognises no entities"):
        pii.Detector(ner_model=str(tmp_path / "blank"))


# ---------------------------------------------------------------------------------------------
# Overlaps, normalisation, redaction


def test_overlaps_keep_the_higher_priority_type_then_the_longer_span() -> None:
    spans = [
        pii.Span("PHONE", 0, 19, "4111 1111 1111 1111", "x"),
        pii.Span("CREDIT_CARD", 0, 19, "4111 1111 1111 1111", "x"),
        pii.Span("EMAIL", 30, 50, "a" * 20, "x"),
        pii.Span("URL_CREDENTIALS", 25, 35, "b" * 10, "x"),
        pii.Span("PERSON", 60, 65, "c" * 5, "x"),
        pii.Span("PERSON", 58, 70, "d" * 12, "x"),
        pii.Span("IP_ADDRESS", 80, 90, "e" * 10, "x"),
    ]
    assert [(s.type, s.start, s.end) for s in pii.resolve_overlaps(spans)] == [
        ("CREDIT_CARD", 0, 19),
        ("URL_CREDENTIALS", 25, 35),
        ("PERSON", 58, 70),
        ("IP_ADDRESS", 80, 90),
    ]


def test_a_card_is_not_also_reported_as_a_phone(detector: pii.Detector) -> None:
    assert [s.type for s in detector.detect("Card: 4111 1111 1111 1111.")] == ["CREDIT_CARD"]


def test_normalise_makes_one_value_of_two_spellings() -> None:
    assert (
        pii.normalise("PHONE", "+1 (415) 555-2671")
        == pii.normalise("PHONE", "415.555.2671")
        == "+14155552671"
    )
    assert pii.normalise("PHONE", "+44 20 7946 0958") == pii.normalise("PHONE", "020 7946 0958")
    assert pii.digest("s", "EMAIL", "Ada@Example.org") == pii.digest("s", "EMAIL", "ada@example.ORG")
    assert pii.digest("s", "EMAIL", "ada@example.org") != pii.digest("t", "EMAIL", "ada@example.org")
    assert pii.digest("s", "PHONE", "+1 415-555-2671") == pii.digest("s", "PHONE", "(415) 555 2671")
    assert pii.digest("s", "PHONE", "+1 415-555-2671") != pii.digest("s", "PHONE", "+1 415-555-2672")
    assert pii.normalise("IBAN", "gb82 west 1234 5698 7654 32") == "GB82WEST12345698765432"
    assert pii.normalise("PERSON", "Ada\n LOVELACE") == "ada lovelace"
    assert pii.normalise("CREDIT_CARD", "4111-1111 1111-1111") == "4111111111111111"


def test_redact_with_masks_and_numbered_pseudonyms(detector: pii.Detector) -> None:
    text = "Mail ada@example.org or bob@example.org; ada@example.org again. Card 4111 1111 1111 1111."
    policy = pii.policy_with_defaults({"EMAIL": pii.PSEUDONYM, "CREDIT_CARD": "nonsense"})
    assert policy["CREDIT_CARD"] == pii.MASK and policy["PHONE"] == pii.KEEP
    numbers: dict[str, int] = {}

    def number_for(value: str):  # noqa: ANN202
        return lambda: numbers.setdefault(pii.normalise("EMAIL", value), len(numbers) + 1)

    replacements = []
    for span in detector.detect(text):
        new = pii.replacement_for(span.type, policy[span.type], number_for(span.text))
        if new is not None:
            replacements.append((span.start, span.end, new))
    assert pii.redact(text, replacements) == (
        "Mail [EMAIL_1] or [EMAIL_2]; [EMAIL_1] again. Card [CREDIT_CARD]."
    )
    assert pii.replacement_for("PHONE", pii.KEEP, lambda: 1 / 0) is None  # not asked for a number


def test_redact_ignores_overlapping_and_out_of_range_spans() -> None:
    assert (
        pii.redact("abcdefgh", [(4, 6, "[Y]"), (0, 3, "[X]"), (2, 5, "[Z]"), (7, 99, "[W]")]) == "[X]d[Y]gh"
    )
    assert pii.redact("abc", []) == "abc"


def test_empty_and_blank_text() -> None:
    assert pii.Detector().detect("") == [] and pii.Detector().detect(" \n\t") == []


# ---------------------------------------------------------------------------------------------
# Look-alikes the benchmark (bench/pii_detection.py) found


def test_an_iban_wins_over_the_card_number_inside_it(detector: pii.Detector) -> None:
    # 16 of this IBAN's digits ("6442 1516 6830 5513") happen to pass the Luhn check.
    text = "Pay ES87 6442 1516 6830 5513 0208 now."
    assert [(s.type, s.text) for s in detector.detect(text)] == [("IBAN", "ES87 6442 1516 6830 5513 0208")]


@pytest.mark.parametrize(
    "text",
    [
        "Pay NL88 PARR 1244 5342 82 now.",  # an IBAN with a wrong checksum: not a phone either
        "Ref 4936-1815-6669-4868 applies.",  # card-shaped, fails Luhn: not a phone either
        "In (1371283209) the bug was closed.",  # a timestamp in parentheses
        "Form (666-12-7769) was filed.",  # an invalid SSN in parentheses
        "Debian (787-12-0000) 8 Jessie.",
        "See Chapter 1995-08-13 3, Choosing.",
        "Keymaps for 0.12.2.25+dfsg keyboards.",
        "Use a mirror: see section 13.8.8.16, near you.",
    ],
)
def test_lookalikes_in_context_are_nothing(detector: pii.Detector, text: str) -> None:
    assert detector.detect(text) == []


def test_phone_spans_leave_an_opening_parenthesis_out(detector: pii.Detector) -> None:
    assert found(detector, "Ring us (+44 7400 128091) today.") == ["+44 7400 128091"]
    assert found(detector, "Ring us (07400 128091) today.") == ["07400 128091"]


def test_phone_cases_that_look_like_other_things(detector: pii.Detector) -> None:
    assert [(s.type, s.text) for s in detector.detect("Tel. +5511961236891 today")] == [
        ("PHONE", "+5511961236891")
    ]
    assert found(detector, "Tel. No. 020 7946 0958", "PHONE") == ["020 7946 0958"]
    assert found(detector, "Appelez le 01.23.45.67.89 demain.", "PHONE") == ["01.23.45.67.89"]


@pytest.mark.parametrize(
    "text",
    [
        "Hyperbolic sine sinh(1) → 1.1752011936438014 for double precision.",  # Luhn by chance
        "0 1499414498 86248 9 rows in the table",  # two numbers of a table
        "Sort (cost=717.34..717.59 rows=101 width=488)",
        "The distance is 0.65655958650282 parsecs.",
        "base/16384/16806 is the file of the table.",
        "Fixed a crash (CVE-2026-116303) in the parser.",
        "04:05:06.789-8 is ISO 8601 with a time zone.",
        "Passing INT_MIN (-2147483648) failed.",
        "See ISBN 0-321-19784-4 for the theory.",
    ],
)
def test_numbers_of_technical_text_are_not_phones_or_cards(text):  # type: ignore[no-untyped-def]
    found = [(s.type, s.text) for s in pii.Detector().detect(text)]
    assert not [f for f in found if f[0] in ("PHONE", "CREDIT_CARD")], found


def test_a_mac_address_and_a_message_id_url_are_not_personal_data():  # type: ignore[no-untyped-def]
    text = (
        "macaddr8 '00:34:56:ab:cd:ef' gives 02:34:56:ff:fe:ab:cd:ef; the thread is at "
        "https://www.postgresql.org/message-id/CAJVSVGV8gX@mail.gmail.com today."
    )
    assert pii.Detector().detect(text) == []


def test_phones_and_cards_with_labels_are_still_found():  # type: ignore[no-untyped-def]
    found = {
        (s.type, s.text) for s in pii.Detector().detect("tel:+44 20 7946 0958, Card: 4111 1111 1111 1111.")
    }
    assert ("PHONE", "+44 20 7946 0958") in found and ("CREDIT_CARD", "4111 1111 1111 1111") in found
