"""Embedded default data for offline jobs.

Everything here is generated locally and deterministically, so the package's
jobs can run without downloading datasets, tokenizers or models:

* a synthetic English movie-review corpus for masked language modelling,
* an SST-2-like sentiment dataset built from the same generator,
* a second sentiment task in another domain (product reviews; some cue words flip polarity), for continual
  learning,
* a BERT-style uncased WordPiece tokenizer trained on those files (mlm, classify),
* a GPT-2-style byte-level BPE tokenizer trained on them (clm),
* a tiny ``BertConfig`` preset and a tiny ``GPT2Config`` preset.

Text is lowercase with punctuation separated by spaces ("the acting was great .").
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE, WordPiece
from transformers import BertConfig, BertTokenizerFast, GPT2Config, PreTrainedTokenizerFast

POSITIVE = "positive"
NEGATIVE = "negative"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator; also its BOS, UNK and (here) padding token
# Always in the tokenizer's alphabet, so unseen ASCII input never maps to [UNK].
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation

MLM_TRAIN_REVIEWS = 12_000
MLM_VALIDATION_REVIEWS = 600
SENTIMENT_TRAIN_SENTENCES = 4_000
SENTIMENT_VALIDATION_SENTENCES = 500
TRAIN_SEED = 0
VALIDATION_SEED = 1

# Probability that a polar sentence is replaced by a mixed or mildly opposite one.
NOISE_RATE = 0.06

# --------------------------------------------------------------------------- word lists

_TITLE_WORDS_A = (
    "silent last hidden golden crimson distant endless forgotten lost midnight northern "
    "secret wild frozen burning quiet iron paper glass velvet electric scarlet painted "
    "winter summer autumn broken final seventh lonely"
).split()
_TITLE_WORDS_B = (
    "harbor river kingdom garden mountain city station island empire shadow horizon "
    "signal letter bridge forest ocean mirror machine lighthouse orchard desert highway "
    "circus frontier voyage promise witness storm echo crown"
).split()
_TITLES = [f"the {a} {b}" for a in _TITLE_WORDS_A for b in _TITLE_WORDS_B]

_FIRST_NAMES = (
    "emma james olivia liam sophia noah ava lucas mia ethan grace henry chloe jack nora "
    "daniel ruby samuel clara leo alice owen isla felix maya oscar lena victor hazel "
    "marcus iris adrian julia simon ella tomas rosa hugo nina elliot vera"
).split()
_LAST_NAMES = (
    "walker hayes morgan bennett carter foster reed brooks hughes price ward ellis "
    "porter grant shaw hart wells lane fisher barnes cole russell stone burke hale "
    "spencer dunn marsh rivera santos kim novak moreau lindqvist okafor tanaka costa "
    "keller varga"
).split()

_GENRES = [
    "thriller", "comedy", "drama", "horror film", "romantic comedy", "science fiction film",
    "western", "documentary", "animated film", "musical", "war film", "crime drama",
    "mystery", "fantasy epic", "family film", "biopic", "heist movie", "courtroom drama",
    "sports drama", "coming of age story", "action movie", "space opera", "period piece",
    "psychological thriller", "spy movie", "disaster movie", "road movie", "superhero movie",
]
_GENRES_PLURAL = [
    "thrillers", "comedies", "dramas", "horror films", "romantic comedies", "science fiction films",
    "westerns", "documentaries", "animated films", "musicals", "war films", "crime dramas",
    "mysteries", "family films", "biopics", "heist movies", "action movies", "spy movies",
    "superhero movies", "movies", "films",
]
_ROLES = [
    "detective", "teacher", "soldier", "nurse", "pilot", "chef", "lawyer", "farmer",
    "journalist", "scientist", "thief", "painter", "boxer", "musician", "priest", "doctor",
    "sailor", "veteran", "student", "mechanic", "spy", "astronaut", "mayor", "librarian",
    "con artist", "police officer", "bus driver", "retired judge", "small town sheriff",
    "struggling writer",
]
_PLOTS = [
    "returns home after twenty years", "searches for a missing sister",
    "tries to win back an old love", "uncovers a conspiracy at work",
    "plans one last robbery", "must survive a brutal winter",
    "falls in love with a stranger", "takes over the family business",
    "trains for a championship fight", "investigates a string of murders",
    "discovers a strange signal from space", "hides a dangerous secret",
    "travels across the country by train", "starts a band with old friends",
    "loses everything in a single night", "protects a witness from the mob",
    "builds a new life in a foreign city", "tries to stop a war",
    "inherits a crumbling old house", "escapes from prison",
]
_PLACES = [
    "paris", "new york", "tokyo", "rural texas", "a small fishing village", "london",
    "the scottish highlands", "a distant planet", "berlin", "a desert town", "rome",
    "a snowy mountain town", "chicago", "the deep south", "a quiet suburb", "mexico city",
    "an abandoned space station", "nineteenth century vienna", "a crowded hospital",
    "a remote island",
]
_WHEN = [
    "last night", "over the weekend", "yesterday", "on a long flight", "this afternoon",
    "at a late screening", "on opening night", "at home on a rainy sunday",
    "at the local theater", "on streaming last week",
]
_COMPANIONS = [
    "my wife", "my husband", "a friend", "my parents", "my kids", "my sister",
    "my brother", "some coworkers", "my roommate", "my grandmother", "my girlfriend",
    "my boyfriend",
]
_EXPECTATIONS = ["high", "low", "no real", "modest", "mixed", "huge"]
_MINUTES = [str(minutes) for minutes in range(85, 181, 5)]

_ASPECTS_SINGULAR = [
    "acting", "plot", "soundtrack", "ending", "cinematography", "dialogue", "script",
    "pacing", "direction", "score", "cast", "story", "editing", "screenplay",
    "opening scene", "final act", "lead performance", "supporting cast", "camera work",
    "sound design", "production design", "twist", "premise", "villain", "music",
    "lighting", "writing", "humor", "first half", "second half", "climax", "romance",
]
_ASPECTS_PLURAL = [
    "visual effects", "special effects", "costumes", "characters", "action scenes",
    "fight scenes", "performances", "jokes", "sets", "songs", "battle scenes",
    "car chases",
]
_ASPECTS = _ASPECTS_SINGULAR + _ASPECTS_PLURAL

_ADVERBS = [
    "really", "truly", "absolutely", "genuinely", "incredibly", "simply", "quite", "very",
    "remarkably", "utterly", "surprisingly", "consistently", "thoroughly", "so",
]

# Per-polarity vocabulary. "mild" words only appear, as {opp_mild}, in noisy clauses of
# reviews of the other polarity; "only" fills "the only {only} thing was ...".
_LEXICON = {
    POSITIVE: {
        "adj": (
            "great excellent wonderful brilliant superb fantastic amazing outstanding beautiful "
            "stunning terrific moving delightful charming gripping powerful impressive fresh "
            "clever memorable touching hilarious thrilling captivating masterful solid engaging "
            "inventive heartfelt breathtaking flawless compelling riveting spectacular marvelous "
            "exceptional lovely gorgeous smart witty uplifting sharp striking polished magnificent "
            "enjoyable entertaining sublime perfect strong inspired authentic tender elegant vivid "
            "remarkable phenomenal dazzling sensational"
        ).split(),
        "mild": [
            "fine", "decent", "okay", "nice", "pleasant", "competent", "serviceable",
            "watchable", "pretty good", "not bad",
        ],
        "noun": [
            "masterpiece", "gem", "triumph", "delight", "treat", "joy", "revelation", "classic",
            "knockout", "winner", "marvel", "crowd pleaser",
        ],
        "verb": ["loved", "adored", "enjoyed", "savored", "relished", "treasured"],
        "superlative": [
            "best", "most enjoyable", "most moving", "finest", "most original", "funniest",
        ],
        "left_feeling": [
            "smiling", "grinning from ear to ear", "in awe", "inspired", "completely satisfied",
            "deeply moved", "with a huge smile", "wanting more", "in tears of joy",
        ],
        "reaction": [
            "laugh out loud", "cry", "smile", "cheer", "think", "hold my breath", "gasp",
        ],
        "recommendation": [
            "highly recommended", "i would highly recommend it", "do not miss it",
            "go see it on the big screen", "i cannot wait to watch it again",
            "definitely worth watching", "easily the best film of the year",
            "it is worth every penny", "see it as soon as you can",
        ],
        "rating": ["eight", "nine", "ten"],
        "comparison": [
            "much better", "far more fun", "even better", "a lot smarter", "far more moving",
        ],
        "verdict": [
            "stays with you long after the credits roll", "reminds you why you love movies",
            "you want to watch again right away", "deserves a much bigger audience",
        ],
        "aspect_verb": [
            "shines", "works beautifully", "never misses", "steals the show", "comes alive",
            "sparkles", "lands perfectly",
        ],
        "only": ["weak", "bad", "disappointing"],
        "expectation_twist": [
            "i expected very little , but it was {adv} {adj} .",
            "i did not expect much , but it won me over completely .",
            "i was not sure about it at first , but by the end i was hooked .",
        ],
    },
    NEGATIVE: {
        "adj": (
            "terrible awful boring dull bland weak horrible dreadful painful lazy clumsy tedious "
            "forgettable mediocre predictable messy confusing lifeless flat wooden poor bad "
            "disappointing pointless shallow uninspired unbearable annoying ridiculous laughable "
            "sloppy stiff cheap tiresome hollow generic cliched overlong bloated incoherent "
            "embarrassing atrocious abysmal stale insipid dreary unconvincing amateurish forced "
            "choppy sluggish monotonous lackluster underwhelming grating muddled tired dismal "
            "pathetic irritating hackneyed"
        ).split(),
        "mild": [
            "a bit slow", "a little weak", "slightly predictable", "somewhat uneven",
            "a bit rough", "not perfect", "a little messy", "a bit dated", "a little thin",
        ],
        "noun": [
            "mess", "disaster", "disappointment", "letdown", "failure", "bore", "chore",
            "train wreck", "slog", "misfire", "dud", "snooze",
        ],
        "verb": ["hated", "disliked", "despised", "loathed", "suffered through", "regretted"],
        "superlative": [
            "worst", "most boring", "dullest", "most annoying", "laziest", "most forgettable",
        ],
        "left_feeling": [
            "disappointed", "annoyed", "bored out of my mind", "wanting my money back",
            "half asleep", "frustrated", "angry", "confused", "with a headache",
        ],
        "reaction": [
            "cringe", "groan", "yawn", "roll my eyes", "want to leave", "check my watch",
            "fall asleep",
        ],
        "recommendation": [
            "avoid it", "skip this one", "save your money", "do not bother",
            "i want those two hours back", "not worth watching",
            "easily the worst film of the year",
            "it is not worth a single penny", "stay home and read a book instead",
        ],
        "rating": ["one", "two", "three"],
        "comparison": [
            "much worse", "far less fun", "even worse", "a lot dumber", "far more boring",
        ],
        "verdict": [
            "you forget before the credits roll", "makes you wonder why anyone made it",
            "you turn off halfway through", "deserves to be forgotten",
        ],
        "aspect_verb": [
            "falls apart", "drags", "never works", "misses the mark", "falls flat",
            "goes nowhere", "ruins everything",
        ],
        "only": ["good", "decent", "nice"],
        "expectation_twist": [
            "i expected a lot , but it was {adv} {adj} .",
            "i really wanted to like it , but it lost me completely .",
            "i went in hopeful , but by the end i was checking my watch .",
        ],
    },
}

# --------------------------------------------------------------------------- templates
# Slots: {title} {name} {genre} {genres} {role} {plot} {place} {when} {companion}
# {expectation} {minutes} {adv} {aspect} {aspect_singular} {the_aspect_was} ("the acting was"),
# any key of _LEXICON ({adj} {noun} {verb} ...) and {opp_<key>} for the other polarity's words.

_NEUTRAL_TEMPLATES = [
    "i watched {title} {when} .",
    "i finally saw {title} {when} with {companion} .",
    "{title} is a {genre} directed by {name} .",
    "{name} stars as a {role} in this {genre} .",
    "the film follows a {role} who {plot} .",
    "it is a {genre} about a {role} who {plot} .",
    "set in {place} , the story follows a {role} who {plot} .",
    "{title} runs about {minutes} minutes .",
    "i went into {title} with {expectation} expectations .",
    "{name} plays a {role} from {place} who {plot} .",
    "the new {genre} from {name} is set in {place} .",
    "{companion} picked {title} for our movie night .",
]

_POLAR_TEMPLATES = [
    "{the_aspect_was} {adj} .",
    "{the_aspect_was} {adv} {adj} .",
    "{title} is {adv} {adj} .",
    "this {genre} is {adv} {adj} .",
    "this movie was {adj} .",
    "the movie was {adv} {adj} .",
    "what a {adj} film !",
    "{name} gives a {adj} performance as the {role} .",
    "the performances from {name} and {name} were {adj} .",
    "{name} was {adv} {adj} as the {role} .",
    "i {verb} every minute of it .",
    "i {verb} this movie .",
    "i {verb} {title} .",
    "this movie was a {noun} from start to finish .",
    "{title} is a {adj} {genre} and a real {noun} .",
    "one of the {superlative} {genres} i have seen in years .",
    "i left the theater {left_feeling} .",
    "the {aspect} made me {reaction} .",
    "it is {adv} {adj} from start to finish .",
    "the story is {adj} and the characters are {adj} .",
    "both the {aspect} and the {aspect} are {adj} .",
    "everything about it , from the {aspect} to the {aspect} , is {adj} .",
    "it is the kind of {genre} that {verdict} .",
    "compared to {title} , this one is {comparison} .",
    "the {aspect_singular} is where this {genre} {aspect_verb} .",
    "it was {adj} , {adj} and {adv} {adj} .",
    "{the_aspect_was} {adj} and {the_aspect_was} {adj} .",
    "the direction by {name} is {adj} .",
    "overall , a {adj} {genre} .",
    "{expectation_twist}",
]

_POLARITY_SPECIFIC_TEMPLATES = {
    POSITIVE: [
        "{name} has never been better .",
        "it kept me on the edge of my seat .",
        "the {aspect_singular} alone is worth the price of admission .",
        "{name} deserves every award for this role .",
        "this is filmmaking at its best .",
        "{the_aspect_was} never {opp_adj} for a second .",
        "i laughed , i cried , and i want to see it again .",
        "it is a breath of fresh air .",
    ],
    NEGATIVE: [
        "this movie was a waste of time .",
        "what a waste of time !",
        "what a waste of money .",
        "it is a waste of a {opp_adj} cast .",
        "even {name} could not save this {genre} .",
        "even the {aspect} could not save it .",
        "the {aspect} alone made me want to walk out .",
        "{the_aspect_was} not {opp_adj} at all .",
        "i almost fell asleep halfway through .",
        "the {aspect} made no sense at all .",
    ],
}

_CLOSING_TEMPLATES = [
    "{recommendation} .",
    "{rating} out of ten .",
    "{recommendation} , {rating} out of ten .",
]

# Mixed sentences: an opposite-polarity clause, but the sentence's overall polarity is clear.
_CONTRAST_TEMPLATES = [
    "{the_aspect_was} {opp_mild} , but {the_aspect_was} {adj} .",
    "although {the_aspect_was} {opp_mild} , the rest was {adv} {adj} .",
    "the only {only} thing was the {aspect} .",
    "{the_aspect_was} {opp_mild} , but overall it was {adj} .",
]

# Mildly opposite sentences, only used in reviews with enough polar sentences to outweigh them.
_OPPOSITE_TEMPLATES = [
    "{the_aspect_was} {opp_mild} .",
    "to be fair , {the_aspect_was} {opp_mild} .",
]

_SHARED_SLOTS = {
    "title": _TITLES, "genre": _GENRES, "genres": _GENRES_PLURAL, "role": _ROLES,
    "plot": _PLOTS, "place": _PLACES, "when": _WHEN, "companion": _COMPANIONS,
    "expectation": _EXPECTATIONS, "minutes": _MINUTES, "adv": _ADVERBS,
}
_SLOT = re.compile(r"\{(\w+)\}")
_ARTICLE = re.compile(r"\ba (?=[aeiou])")


@dataclass(frozen=True)
class _Domain:
    """What a review domain is made of: per-polarity words, shared slot fillers, aspects and templates."""

    lexicon: dict  # polarity -> {slot: words}
    shared_slots: dict  # slot -> words, the same for both polarities
    aspects_singular: list
    aspects_plural: list
    neutral: list
    polar: list
    polarity_specific: dict  # polarity -> templates
    closing: list
    contrast: list
    opposite: list

    @property
    def aspects(self) -> list:
        return self.aspects_singular + self.aspects_plural


_MOVIES = _Domain(_LEXICON, _SHARED_SLOTS, _ASPECTS_SINGULAR, _ASPECTS_PLURAL, _NEUTRAL_TEMPLATES,
                  _POLAR_TEMPLATES, _POLARITY_SPECIFIC_TEMPLATES, _CLOSING_TEMPLATES, _CONTRAST_TEMPLATES,
                  _OPPOSITE_TEMPLATES)

# --------------------------------------------------------------------------- second domain: product reviews
# Task B of the continual-learning benchmark (bench/continual.py): the same two labels, another domain. Its own
# nouns and aspects tell the domains apart (every product review names a product, a brand or a part), and most
# of its adjectives are movie-review adjectives of the OPPOSITE polarity: a "predictable", "boring", "cheap"
# product is good, a "thrilling", "sharp", "memorable" one is bad. A model can learn both domains at once (the
# domain is always visible), but fine-tuning on products alone re-learns those words with their product meaning,
# and the movie reviews that rely on them flip: forgetting that is measurable, and that EWC, replay and
# distillation from the previous model can reduce.

# Movie-review adjectives whose polarity is reversed in product reviews (each is in _LEXICON[...]["adj"]).
FLIPPED_TO_POSITIVE = (  # an uneventful product is a good one
    "predictable boring bland forgettable monotonous generic flat stiff cheap wooden dull hollow forced shallow "
    "uninspired lifeless lackluster underwhelming insipid sluggish overlong lazy"
).split()
FLIPPED_TO_NEGATIVE = (  # an exciting one is not
    "thrilling gripping breathtaking stunning riveting sensational dazzling spectacular striking moving touching "
    "hilarious sharp powerful memorable captivating compelling inventive vivid tender brilliant engaging uplifting "
    "entertaining clever"
).split()

_PRODUCTS = [
    "blender", "vacuum cleaner", "laptop", "phone", "kettle", "toaster", "headphones", "coffee maker", "drill",
    "monitor", "keyboard", "printer", "mattress", "backpack", "tent", "bike", "stroller", "speaker", "webcam",
    "microwave", "router", "office chair", "air fryer", "washing machine", "lawn mower", "fitness tracker",
    "electric toothbrush", "tablet", "desk lamp", "space heater",
]
_PRODUCTS_PLURAL = [
    "blenders", "vacuum cleaners", "laptops", "phones", "kettles", "toasters", "coffee makers", "drills",
    "monitors", "keyboards", "printers", "mattresses", "backpacks", "tents", "bikes", "speakers", "webcams",
    "gadgets", "appliances", "products",
]
_BRANDS = (
    "voltra nordline zenix brightway kestrel polarix maplecore summitex vertana apexon lumena arcadyn halcyra "
    "quorvo tindle brevix caldera oakhurst novatek ferrow"
).split()
_PRODUCT_WHEN = [
    "last month", "two weeks ago", "on sale", "for my birthday", "on black friday", "after my old one broke",
    "online", "last year", "at the hardware store", "for our new apartment",
]
_WEEKS = [str(weeks) for weeks in range(2, 31)]
_PRODUCT_ASPECTS_SINGULAR = [
    "battery", "price tag", "casing", "build quality", "touchpad", "motor", "handle", "lid", "cable", "charger",
    "manual", "warranty", "packaging", "fit", "coating", "setup", "app", "display", "switch", "base", "strap",
    "zipper", "blade", "filter", "fan", "customer service", "delivery", "power cord", "frame", "touchscreen",
]
_PRODUCT_ASPECTS_PLURAL = [
    "buttons", "wheels", "brakes", "hinges", "controls", "batteries", "accessories", "seams", "legs",
    "instructions", "attachments", "settings",
]
_PRODUCT_LEXICON = {
    POSITIVE: {
        "adj": (
            "durable sturdy reliable efficient comfortable lightweight quiet sleek compact affordable handy "
            "dependable great solid"
        ).split() + FLIPPED_TO_POSITIVE,
        "mild": ["fine", "okay", "adequate", "acceptable", "usable", "not bad", "good enough"],
        "noun": ["bargain", "lifesaver", "steal", "keeper", "workhorse", "game changer", "must have", "great buy"],
        "verb": ["love", "adore", "trust", "rely on", "recommend", "use daily"],
        "superlative": ["best", "most reliable", "sturdiest", "most useful", "quietest", "finest"],
        "arrival": ["on time and well packed", "a day early", "quickly and in perfect shape", "exactly as described"],
        "recommendation": [
            "buy it", "i would buy it again", "order one today", "worth every penny",
            "the best purchase i made this year", "you will not regret it",
        ],
        "rating": ["four", "five"],
        "comparison": ["much better", "far sturdier", "even better", "a lot quieter", "far more reliable"],
        "aspect_verb": ["shines", "works perfectly", "never fails", "stands out", "really delivers"],
        "only": ["weak", "bad", "annoying"],
        "expectation_twist": [
            "i expected very little for the price , but this {product} is {adv} {adj} .",
            "i did not expect much from a {product} , but this one won me over .",
        ],
    },
    NEGATIVE: {
        "adj": (
            "flimsy faulty defective fragile noisy leaky clunky unreliable overpriced wobbly glitchy loose "
            "shoddy useless terrible awful"
        ).split() + FLIPPED_TO_NEGATIVE,
        "mild": ["a bit loud", "a little flimsy", "slightly awkward", "a bit heavy", "not perfect", "a little fiddly"],
        "noun": ["lemon", "rip off", "piece of junk", "paperweight", "waste of money", "scam", "headache", "dud"],
        "verb": ["returned", "regret buying", "hate", "gave up on", "threw out", "want a refund for"],
        "superlative": ["worst", "least reliable", "flimsiest", "most useless", "loudest", "cheapest looking"],
        "arrival": ["late and damaged", "with parts missing", "in a crushed box", "two weeks late"],
        "recommendation": [
            "do not buy it", "return it while you can", "save your money", "look elsewhere",
            "the worst purchase i made this year", "you will regret it",
        ],
        "rating": ["one", "two"],
        "comparison": ["much worse", "far flimsier", "even worse", "a lot louder", "far less reliable"],
        "aspect_verb": ["fails", "breaks", "never works", "falls apart", "gives up"],
        "only": ["good", "decent", "nice"],
        "expectation_twist": [
            "i expected a lot , but this {product} is {adv} {adj} .",
            "i really wanted to like this {product} , but it let me down .",
        ],
    },
}
_PRODUCT_NEUTRAL_TEMPLATES = [
    "i bought the {brand} {product} {when} .",
    "i ordered this {product} {when} for {companion} .",
    "we have had this {product} for about {weeks} weeks now .",
    "i needed a new {product} after my old one broke .",
    "i went with the {brand} {product} with {expectation} expectations .",
    "i use this {product} every day at home .",
    "{companion} recommended the {brand} {product} to me .",
    "i compared several {products} before buying this one .",
    "it replaced a {brand} {product} i had for years .",
]
_PRODUCT_POLAR_TEMPLATES = [
    "{the_aspect_was} {adj} .",
    "{the_aspect_was} {adv} {adj} .",
    "this {product} is {adv} {adj} .",
    "the {brand} {product} is {adj} .",
    "what a {adj} {product} !",
    "my new {product} is {adj} .",
    "i {verb} this {product} .",
    "this {product} is a {noun} .",
    "the {brand} {product} is a {adj} {product} and a real {noun} .",
    "{the_aspect_was} {adj} and {the_aspect_was} {adj} .",
    "one of the {superlative} {products} i have owned .",
    "both the {aspect} and the {aspect} are {adj} .",
    "after {weeks} weeks , the {product} is still {adj} .",
    "compared to my old {product} , this one is {comparison} .",
    "the {aspect_singular} is where this {product} {aspect_verb} .",
    "the {product} arrived {arrival} .",
    "for the price , this {product} is {adj} .",
    "the {product} was {adj} , {adj} and {adv} {adj} .",
    "{expectation_twist}",
]
_PRODUCT_POLARITY_SPECIFIC_TEMPLATES = {
    POSITIVE: [
        "this {product} does exactly what it says on the box .",
        "i bought a second {product} for {companion} .",
        "setting up the {product} took less than five minutes .",
        "the {aspect} never felt {opp_adj} .",
    ],
    NEGATIVE: [
        "the {product} stopped working after {weeks} weeks .",
        "i sent the {product} back the next day .",
        "the {brand} customer service never answered my emails .",
        "the {aspect} felt {opp_adj} at first , but not for long .",
        "the {aspect} broke in the first week .",
    ],
}
_PRODUCT_CLOSING_TEMPLATES = [
    "{recommendation} .",
    "{rating} out of five stars .",
    "{recommendation} , {rating} stars .",
]
_PRODUCT_CONTRAST_TEMPLATES = [
    "{the_aspect_was} {opp_mild} , but {the_aspect_was} {adj} .",
    "although {the_aspect_was} {opp_mild} , the {product} is {adv} {adj} .",
    "the only {only} thing about the {product} was the {aspect} .",
    "{the_aspect_was} {opp_mild} , but overall the {product} is {adj} .",
]
_PRODUCTS_DOMAIN = _Domain(
    _PRODUCT_LEXICON,
    {"product": _PRODUCTS, "products": _PRODUCTS_PLURAL, "brand": _BRANDS, "when": _PRODUCT_WHEN,
     "companion": _COMPANIONS, "expectation": _EXPECTATIONS, "weeks": _WEEKS, "adv": _ADVERBS},
    _PRODUCT_ASPECTS_SINGULAR, _PRODUCT_ASPECTS_PLURAL, _PRODUCT_NEUTRAL_TEMPLATES, _PRODUCT_POLAR_TEMPLATES,
    _PRODUCT_POLARITY_SPECIFIC_TEMPLATES, _PRODUCT_CLOSING_TEMPLATES, _PRODUCT_CONTRAST_TEMPLATES,
    _OPPOSITE_TEMPLATES,
)
DOMAINS = {"movies": _MOVIES, "products": _PRODUCTS_DOMAIN}


def _opposite(polarity: str) -> str:
    return NEGATIVE if polarity == POSITIVE else POSITIVE


def _fill(template: str, polarity: str, rng: random.Random, domain: _Domain) -> str:
    """Fill every ``{slot}`` of ``template`` left to right with ``domain``'s words of ``polarity``.

    Words are not repeated within a sentence (e.g. two different aspects or adjectives).
    """
    lexicon = domain.lexicon[polarity]
    opposite = domain.lexicon[_opposite(polarity)]
    used: set[str] = set()

    def fresh(choices: list[str]) -> str:
        while (word := rng.choice(choices)) in used:
            pass
        used.add(word)
        return word

    def pick(match: re.Match) -> str:
        slot = match.group(1)
        if slot == "name":
            return f"{fresh(_FIRST_NAMES)} {fresh(_LAST_NAMES)}"
        if slot == "aspect":
            return fresh(domain.aspects)
        if slot == "aspect_singular":
            return fresh(domain.aspects_singular)
        if slot == "the_aspect_was":
            aspect = fresh(domain.aspects)
            return f"the {aspect} {'were' if aspect in domain.aspects_plural else 'was'}"
        if slot == "expectation_twist":
            return _fill(rng.choice(lexicon[slot]), polarity, rng, domain)
        if slot.startswith("opp_"):
            return fresh(opposite[slot.removeprefix("opp_")])
        return fresh(domain.shared_slots[slot] if slot in domain.shared_slots else lexicon[slot])

    sentence = _SLOT.sub(pick, template)
    return _ARTICLE.sub("an ", sentence)


def _polar_sentence(polarity: str, rng: random.Random, domain: _Domain) -> str:
    pool = domain.polar + domain.polarity_specific[polarity]
    return _fill(rng.choice(pool), polarity, rng, domain)


def _review(polarity: str, num_sentences: int, rng: random.Random, domain: _Domain) -> str:
    """Build one review: optional neutral opener, polar body, optional closing verdict."""
    opener = num_sentences >= 2 and rng.random() < 0.35
    closer = num_sentences - opener >= 2 and rng.random() < 0.3
    num_polar = num_sentences - opener - closer
    sentences = [_fill(rng.choice(domain.neutral), polarity, rng, domain)] if opener else []
    opposite_used = False
    for _ in range(num_polar):
        if rng.random() >= NOISE_RATE:
            sentences.append(_polar_sentence(polarity, rng, domain))
        elif num_polar >= 3 and not opposite_used:
            opposite_used = True
            sentences.append(_fill(rng.choice(domain.opposite), polarity, rng, domain))
        else:
            sentences.append(_fill(rng.choice(domain.contrast), polarity, rng, domain))
    if closer:
        sentences.append(_fill(rng.choice(domain.closing), polarity, rng, domain))
    return " ".join(sentences)


def generate_reviews(num_reviews: int, seed: int = 0, max_sentences: int = 4, domain: str = "movies") -> list[dict]:
    """Generate ``num_reviews`` synthetic reviews ``{"text", "label"}`` of ``domain`` (movies or products).

    Deterministic for a given seed (uses only a private ``random.Random``). Labels are
    exactly balanced (one extra "positive" for odd counts) and shuffled. Each review has
    between 1 and ``max_sentences`` sentences.
    """
    chosen = DOMAINS.get(domain)
    if chosen is None:
        raise ValueError(f"unknown review domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    rng = random.Random(seed)
    labels = [POSITIVE, NEGATIVE] * (num_reviews // 2) + [POSITIVE] * (num_reviews % 2)
    rng.shuffle(labels)
    return [
        {"text": _review(label, rng.randint(1, max_sentences), rng, chosen), "label": label}
        for label in labels
    ]


def write_mlm_corpus(directory: str | Path) -> tuple[str, str]:
    """Write ``train.txt`` and ``validation.txt`` (one review per line); return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count, seed in (
        ("train.txt", MLM_TRAIN_REVIEWS, TRAIN_SEED),
        ("validation.txt", MLM_VALIDATION_REVIEWS, VALIDATION_SEED),
    ):
        path = directory / name
        lines = (review["text"] for review in generate_reviews(count, seed))
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


def write_sentiment_dataset(directory: str | Path) -> tuple[str, str]:
    """Write SST-2-like ``train.jsonl`` and ``validation.jsonl`` (movie reviews); return their paths.

    Each line is ``{"sentence": ..., "label": "positive" | "negative"}``, 1-2 sentences long.
    """
    return _write_sentiment(directory, "movies", 100)


def write_product_sentiment_dataset(directory: str | Path) -> tuple[str, str]:
    """The second sentiment task: product reviews, written like ``write_sentiment_dataset`` (same files, sizes,
    columns and labels). Some cue words have the opposite polarity of the movie reviews' (FLIPPED_TO_POSITIVE,
    FLIPPED_TO_NEGATIVE): task B of bench/continual.py."""
    return _write_sentiment(directory, "products", 200)


def _write_sentiment(directory: str | Path, domain: str, seed_offset: int) -> tuple[str, str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count, seed in (
        ("train.jsonl", SENTIMENT_TRAIN_SENTENCES, TRAIN_SEED + seed_offset),
        ("validation.jsonl", SENTIMENT_VALIDATION_SENTENCES, VALIDATION_SEED + seed_offset),
    ):
        path = directory / name
        records = generate_reviews(count, seed, max_sentences=2, domain=domain)
        path.write_text(
            "".join(
                json.dumps({"sentence": record["text"], "label": record["label"]}) + "\n"
                for record in records
            ),
            encoding="utf-8",
        )
        paths.append(str(path))
    return paths[0], paths[1]


def _bert_backend(vocab: dict[str, int] | None = None) -> Tokenizer:
    """An uncased BERT-style WordPiece tokenizer backend, untrained when ``vocab`` is None."""
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _characters(path: str, normalizer: normalizers.Normalizer) -> set[str]:
    """The non-space characters of a file after normalization (read in 1 MiB chunks)."""
    characters: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        while chunk := handle.read(1 << 20):
            characters.update(normalizer.normalize_str(chunk))
    return {char for char in characters if not char.isspace()}


def train_wordpiece_tokenizer(
    files: list[str], vocab_size: int = 8000, output_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Train an uncased BERT-style WordPiece tokenizer on ``files``, deterministically.

    Returns a ``BertTokenizerFast`` (a ``PreTrainedTokenizerFast``) with ``model_max_length=512``,
    saved with ``save_pretrained(output_dir)`` when ``output_dir`` is given. The vocabulary is
    smaller than ``vocab_size`` when the corpus runs out of merges (about 2k tokens for the
    default corpus).
    """
    files = [str(file) for file in files]
    draft = _bert_backend()
    characters = (_characters(file, draft.normalizer) for file in files)
    alphabet = sorted(set(_ALPHABET).union(*characters))
    # The trainer gives "##c" tokens ids in hash-map order, which changes merge tie-breaks from run
    # to run (huggingface/tokenizers#1794). Listing them up front as special tokens fixes their ids;
    # the final tokenizer is then rebuilt from the trained vocabulary with only the real specials.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [f"##{char}" for char in alphabet],
        initial_alphabet=alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    draft.train(files, trainer)
    backend = _bert_backend(draft.get_vocab(with_added_tokens=False))
    backend.add_special_tokens(SPECIAL_TOKENS)
    # BertTokenizerFast re-installs this same template; setting it keeps the backend self-contained.
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, backend.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
    """A tiny BERT preset (128 hidden, 2 layers, 2 heads); ``overrides`` are applied on top."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=256,
        type_vocab_size=2,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def train_byte_level_bpe_tokenizer(
    files: list[str], vocab_size: int = 8000, output_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``files``, with ``<|endoftext|>`` as EOS.

    Byte-level: every string encodes (no unknown token), and decoding gives back the exact text. The end-of-text
    token (id 0) is also BOS and UNK, as GPT-2's, and there is no padding token, as in GPT-2 (blocks need none);
    no token is added on encoding (the clm job appends EOS to each document). Saved with ``save_pretrained(output_dir)`` so ``pipeline("text-generation")`` loads it.
    """
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(file) for file in files], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        unk_token=END_OF_TEXT, model_max_length=1024)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def tiny_gpt2_config(vocab_size: int, **overrides) -> GPT2Config:
    """A tiny GPT-2 preset (128 wide, 2 layers, 2 heads, 256 positions); ``overrides`` are applied on top.

    BOS/EOS are id 0, ``<|endoftext|>`` of ``train_byte_level_bpe_tokenizer`` (GPT-2's 50256 is outside a small
    vocabulary)."""
    settings = dict(vocab_size=vocab_size, n_embd=128, n_layer=2, n_head=2, n_inner=512, n_positions=256,
                    bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    return GPT2Config(**settings)
