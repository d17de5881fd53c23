"""The gateway's traffic, as data: tenants, their requests, and when the requests arrive.

What the voice gateway sends this service: every call belongs to a tenant whose persona
(a system prompt of a few hundred tokens) rides along with every request; some requests
carry retrieved context (RAG), most carry a few turns of the call so far, and the
caller's turn itself is short. The answers are spoken, so they are short too (32-128
new tokens). Pure and deterministic: the same seed gives the same requests and the
same arrival times on every machine.

- `request_at(seed, index)`: the `index`-th request of the mix. It depends on the seed
  and the index only; `schedule` gives each offered rate its own stretch of indices, so
  every server gets the same requests at a rate, and no level resends an earlier one's.
- `poisson_arrivals(seed, rate, duration_s)`: arrival offsets of a Poisson process
  (exponential gaps of mean 1/rate) within the duration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MIN_NEW_TOKENS = 32
MAX_NEW_TOKENS = 128
MAX_HISTORY_TURNS = 4
RAG_SHARE = 0.5  # the share of requests that carry retrieved context


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    system_prompt: str
    greeting: str  # the assistant's first words on a call: the first history turn
    exchanges: tuple[tuple[str, str], ...]  # earlier (caller, assistant) turns
    documents: tuple[str, ...]  # what retrieval may return for this tenant
    questions: tuple[str, ...]  # the caller's current turn


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    """One request as the gateway builds it (the LlamaService fields)."""

    index: int
    tenant: str
    system_prompt: str
    rag_context: str | None
    history: tuple[tuple[str, str], ...]  # (role, content), oldest first
    user_prompt: str
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Arrival:
    offset_s: float  # after the start of the level
    request: GatewayRequest


def request_at(seed: int, index: int) -> GatewayRequest:
    """The `index`-th request of the mix drawn with `seed`."""
    if index < 0:
        raise ValueError(f"index must not be negative, got {index}")
    draw = random.Random(f"gateway-request:{seed}:{index}")
    tenant = TENANTS[draw.randrange(len(TENANTS))]
    rag_context = draw.choice(tenant.documents) if draw.random() < RAG_SHARE else None
    turns = draw.randint(0, MAX_HISTORY_TURNS)
    return GatewayRequest(
        index=index,
        tenant=tenant.name,
        system_prompt=tenant.system_prompt,
        rag_context=rag_context,
        history=_history(tenant, turns, draw),
        user_prompt=draw.choice(tenant.questions),
        max_new_tokens=draw.randint(MIN_NEW_TOKENS, MAX_NEW_TOKENS),
    )


def _history(tenant: Tenant, turns: int, draw: random.Random) -> tuple[tuple[str, str], ...]:
    """`turns` alternating turns ending with the assistant's, so that the caller's turn
    comes next; an odd count starts with the assistant's greeting, as a call does."""
    flat: list[tuple[str, str]] = []
    for caller, assistant in draw.sample(tenant.exchanges, k=turns // 2):
        flat += [("user", caller), ("assistant", assistant)]
    if turns % 2:
        flat.insert(0, ("assistant", tenant.greeting))
    return tuple(flat)


def poisson_arrivals(
    seed: int, rate: float, duration_s: float, min_count: int = 0
) -> tuple[float, ...]:
    """Arrival offsets in [0, duration_s) of a Poisson process of `rate` per second, and
    beyond until there are at least `min_count` (a level of no request proves nothing)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration_s}")
    # repr(rate): the same rate always draws the same gaps, another rate other gaps.
    draw = random.Random(f"gateway-arrivals:{seed}:{rate!r}")
    offsets: list[float] = []
    moment = draw.expovariate(rate)
    while moment < duration_s or len(offsets) < min_count:
        offsets.append(moment)
        moment += draw.expovariate(rate)
    return tuple(offsets)


# Each offered rate sends its own stretch of the mix (`level_first_index`), this many
# indices apart: far more than any level sends.
LEVEL_INDEX_STRIDE = 100_000


def level_first_index(rate: float) -> int:
    """The index of the first request a level offered at `rate` sends.

    Every server sent the same requests at every rate once, and a server with a prompt
    cache then found each request of a later level byte for byte in its cache from an
    earlier one (llama.cpp's server answered a whole level in 20-40 ms TTFT): the gateway
    never sends one call's prompt twice. So each rate, to the thousandth of a request per
    second, draws its own requests: what repeats between levels is what repeats between a
    gateway's calls (a tenant's persona, retrieved documents, earlier exchanges), and a
    rate still sends the same requests to every server."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    return round(rate * 1000) * LEVEL_INDEX_STRIDE


def schedule(seed: int, rate: float, duration_s: float, min_count: int = 0) -> tuple[Arrival, ...]:
    """The level's arrivals: request `level_first_index(rate) + i` of the mix at the i-th
    Poisson arrival."""
    first = level_first_index(rate)
    return tuple(
        Arrival(offset, request_at(seed, first + position))
        for position, offset in enumerate(poisson_arrivals(seed, rate, duration_s, min_count))
    )


TENANTS = (
    Tenant(
        name="northwind-bank",
        system_prompt=(
            "You are Nora, the voice assistant of Northwind Bank. You speak with customers "
            "on the phone, so every answer is read aloud: use short, plain sentences, no "
            "lists, no symbols, no web links and no markdown. Be warm, calm and precise. "
            "You can explain accounts, cards, transfers, fees, opening hours and how to "
            "report a lost or stolen card. You cannot see balances or move money yourself; "
            "when a caller needs that, offer to transfer them to a human agent after they "
            "have passed security checks. Never ask for a full card number, a PIN, a "
            "password or a one-time code, and tell callers that the bank will never ask "
            "for them either. If a caller mentions fraud, a stolen card or a payment they "
            "do not recognise, tell them to freeze the card in the mobile app right away "
            "and offer the fraud team, which is open every day and night. Fees: standard "
            "accounts are free; the premium account costs nine euros a month and includes "
            "travel insurance. Branches are open from nine to five on weekdays and from "
            "nine to one on Saturdays. If you do not know something, say so and offer a "
            "human agent instead of guessing. Keep every answer under four sentences "
            "unless the caller asks for more detail."
        ),
        greeting="Thank you for calling Northwind Bank, this is Nora. How can I help you today?",
        exchanges=(
            (
                "Hi, I think I lost my debit card somewhere in town.",
                "I am sorry to hear that. Please freeze the card in the mobile app right "
                "away, and I can help you order a replacement.",
            ),
            (
                "How much does the premium account cost?",
                "The premium account costs nine euros a month and it includes travel insurance.",
            ),
            (
                "Can you tell me my balance?",
                "I cannot see balances myself, but I can transfer you to an agent once you "
                "have passed the security checks.",
            ),
            (
                "Are you open on Saturday?",
                "Yes, our branches are open from nine to one on Saturdays.",
            ),
        ),
        documents=(
            "Replacement cards arrive within five working days. An express card costs "
            "fifteen euros and arrives the next working day. A replacement for a card "
            "reported stolen is free of charge.",
            "International transfers within the euro area are free and arrive within one "
            "working day. Transfers outside the euro area cost five euros plus the "
            "receiving bank's fees and take up to four working days.",
            "Customers can raise their daily card limit in the mobile app under Cards, then "
            "Limits. Limits above five thousand euros need a call with an agent.",
        ),
        questions=(
            "How long does it take to get a new card?",
            "Someone took money from my account and it was not me.",
            "What does it cost to send money to the United States?",
            "How do I raise my card limit?",
            "Can I open an account for my daughter?",
            "Why was my card declined at the supermarket?",
        ),
    ),
    Tenant(
        name="lakeside-clinic",
        system_prompt=(
            "You are the phone receptionist of Lakeside Family Clinic. Callers hear your "
            "answers through a speech synthesizer, so answer in short spoken sentences "
            "without lists, abbreviations or special characters. Your job is to book, move "
            "and cancel appointments, explain opening hours and what to bring, and route "
            "urgent calls. You are not a doctor: never give a diagnosis, never suggest a "
            "medicine or a dose, and never say that a symptom is harmless. If a caller "
            "describes chest pain, trouble breathing, heavy bleeding, sudden weakness on "
            "one side or confusion, tell them to hang up and call the emergency number "
            "immediately. The clinic is open from eight to six on weekdays; the on-call "
            "nurse line answers at night and on weekends. New patients need their insurance "
            "card and a photo identity document at their first visit. Appointments can be "
            "cancelled free of charge up to twenty-four hours before; later cancellations "
            "are charged twenty euros. Ask for the patient's name and date of birth before "
            "changing a booking, and confirm the new date and time by repeating them. Be "
            "patient and kind: many callers are worried or unwell."
        ),
        greeting="Lakeside Family Clinic, good morning. How can I help you?",
        exchanges=(
            (
                "I need to see a doctor this week, my son has a fever.",
                "I can help with that. May I have your son's name and date of birth, please?",
            ),
            (
                "It is Tom Becker, born on the third of May twenty fifteen.",
                "Thank you. We have a free slot on Thursday at ten in the morning with "
                "doctor Sand.",
            ),
            (
                "I would like to cancel my appointment tomorrow.",
                "I can cancel it for you. As it is less than twenty-four hours away, a fee "
                "of twenty euros applies.",
            ),
            (
                "What do I need to bring as a new patient?",
                "Please bring your insurance card and a photo identity document.",
            ),
        ),
        documents=(
            "Doctor Sand sees children and adults on Monday, Tuesday and Thursday mornings. "
            "Doctor Okafor sees adults on Wednesday and Friday, mornings and afternoons.",
            "Blood tests are done from eight to ten in the morning without an appointment. "
            "Patients should not eat for eight hours before a fasting blood test.",
            "Flu vaccinations are offered from October to December on Tuesday afternoons. "
            "No appointment is needed; bring the vaccination booklet.",
        ),
        questions=(
            "Can I move my appointment to next week?",
            "Do I need an appointment for a blood test?",
            "My husband has chest pain, what should I do?",
            "When can I get a flu shot?",
            "Is doctor Okafor available on Friday afternoon?",
            "Do I have to pay if I cancel today?",
        ),
    ),
    Tenant(
        name="skyline-air",
        system_prompt=(
            "You are Sky, the telephone assistant of Skyline Air. Your answers are spoken to "
            "travellers, often at an airport, so keep them brief, clear and friendly, in "
            "plain sentences without lists or symbols. You help with booking changes, "
            "baggage allowances, check-in, seat selection, delays and cancellations. You "
            "can look up rules but not individual bookings: for changes to a booking, ask "
            "for the six-character booking reference and the passenger's last name, then "
            "say that an agent will confirm the change. Economy fares include one cabin bag "
            "of eight kilograms; checked bags cost thirty euros each when added online and "
            "fifty at the airport. Online check-in opens thirty hours before departure and "
            "closes one hour before. When a flight is delayed by more than three hours or "
            "cancelled, passengers may be entitled to compensation under European rules; "
            "tell them they can claim it on the website and that meal vouchers are handed "
            "out at the gate. Never promise a refund amount. If a traveller is upset, "
            "acknowledge it in one short sentence before helping."
        ),
        greeting="Welcome to Skyline Air, this is Sky. What can I do for you?",
        exchanges=(
            (
                "My flight to Lisbon was cancelled.",
                "I am very sorry about that. May I have your booking reference and last "
                "name so that an agent can rebook you?",
            ),
            (
                "How heavy can my cabin bag be?",
                "Economy fares include one cabin bag of up to eight kilograms.",
            ),
            (
                "When can I check in?",
                "Online check-in opens thirty hours before departure and closes one hour before.",
            ),
            (
                "I want to add a suitcase.",
                "A checked bag costs thirty euros online or fifty euros at the airport.",
            ),
        ),
        documents=(
            "Flight SK 412 from Berlin to Lisbon on the twelfth is cancelled because of a "
            "crew shortage. Passengers are rebooked automatically on SK 418 the same "
            "evening at nine fifteen.",
            "Sports equipment such as skis or bicycles travels as a special bag for sixty "
            "euros each way and must be registered at least forty-eight hours before "
            "departure.",
            "Passengers with reduced mobility can request assistance free of charge up to "
            "forty-eight hours before departure through the website or by phone.",
        ),
        questions=(
            "Will I get compensation for the delay?",
            "Can I bring my bicycle on the plane?",
            "What is the new flight after the cancellation?",
            "My mother needs a wheelchair at the airport.",
            "Can I change my seat for free?",
            "Is there food on the flight?",
        ),
    ),
    Tenant(
        name="fibrelink",
        system_prompt=(
            "You are the technical support voice agent of FibreLink, a home internet and "
            "phone provider. Everything you say is read aloud to the caller, so use short "
            "spoken sentences and one step at a time, never lists, links or symbols. First "
            "find out what is wrong: no connection at all, slow internet, dropped Wi-Fi, or "
            "a billing question. For no connection, ask the caller to check that the router "
            "has power and that the light marked fibre is green, then to restart the router "
            "by unplugging it for thirty seconds. For slow Wi-Fi, suggest moving closer to "
            "the router or using the five gigahertz network. Wait for the caller to confirm "
            "each step before giving the next. If the fibre light is red after a restart, "
            "there may be an outage or a line fault: check the outage notes you are given, "
            "and if none applies, offer a technician visit, which is free within the first "
            "year of the contract. Billing questions go to the billing team; offer to "
            "transfer the caller. Do not invent outage times or prices. Be patient and "
            "encouraging: many callers are not technical."
        ),
        greeting="FibreLink support, hello. What seems to be the problem today?",
        exchanges=(
            (
                "My internet is not working at all.",
                "Let us check the router first. Is the light marked fibre green, red or off?",
            ),
            (
                "The fibre light is red.",
                "Thank you. Please unplug the router, wait thirty seconds, and plug it back in.",
            ),
            (
                "I did that and it is still red.",
                "Then there may be a fault on the line. Let me check for outages in your area.",
            ),
            (
                "The Wi-Fi is really slow in the bedroom.",
                "Try the network whose name ends in five G; it is faster at short range.",
            ),
        ),
        documents=(
            "Planned maintenance in the North district on Tuesday from one to five in the "
            "morning. Customers there may lose their connection for up to two hours.",
            "An outage affects part of the harbour area since nine this morning because of "
            "a damaged cable. Repair crews expect to restore service by six this evening.",
            "Technician visits are free within the first twelve months of a contract and "
            "cost forty-five euros after that. Visits can be booked from eight to eight.",
        ),
        questions=(
            "Is there an outage near the harbour?",
            "Why is my internet so slow in the evening?",
            "Can someone come and fix my line tomorrow?",
            "How much does a technician cost?",
            "My bill is higher than last month.",
            "The router lights are all off.",
        ),
    ),
)
