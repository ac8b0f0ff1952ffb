"""A seeded story grammar: the offline, reproducible pretraining corpus of tiltlm's default prior.

`generate_stories(n, seed)` writes short children's stories (3–7 sentences): a character is
introduced, something happens (a lost toy, a new friend, a storm, a dark cave, a party, ...) and the
story ends happily, sadly or scarily. The endings carry clear sentiment words ("smiled", "cried",
"screamed") so that a sentiment reward such as VADER has real signal on the prior's samples, and
common words ("dog", "cat", "happy", "sad") occur with varied frequency, so lexical constraints are
neither certain nor impossible.

A template is a string with two kinds of holes, expanded in this order:

* ``[a|b|c]`` picks one alternative uniformly (alternatives may be empty, brackets may nest);
* ``{slot}`` is filled from the story's context (character names, pronouns, place, object, ...).

Everything random is drawn from one ``random.Random(seed)``, so a seed names a corpus exactly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["generate_stories"]

# --------------------------------------------------------------------------------------- lexicon

_FEMALE_NAMES = (
    "Lily", "Anna", "Mia", "Sue", "Lucy", "Emma", "Rosa", "Daisy", "Molly", "Ruby", "Sara", "Kim",
    "Zoe", "Ella", "Nina", "Amy", "Bella", "Maya", "Grace", "Ivy", "Jane", "Lola", "Hannah", "Rose",
)
_MALE_NAMES = (
    "Tom", "Max", "Ben", "Sam", "Jack", "Leo", "Tim", "Finn", "Oscar", "Milo", "Jake", "Noah",
    "Pip", "Bob", "Charlie", "Toby", "Rex", "Jim", "Danny", "Eli", "Joe", "Teddy", "Oliver", "Ned",
)

# (noun, gender or "" for either, is_animal, weight, features): weights make "dog" and "cat"
# common but not universal; features are things this kind of character "had".
_KINDS = (
    ("dog", "", True, 7, ("a loud bark and a waggy tail", "soft brown fur", "floppy ears")),
    ("cat", "", True, 6, ("soft fur and long whiskers", "green eyes", "a long striped tail")),
    ("rabbit", "", True, 3, ("long ears and a fluffy tail", "a twitchy pink nose")),
    ("bear", "", True, 3, ("thick brown fur", "big paws and a kind face")),
    ("fox", "", True, 2, ("a red bushy tail", "pointy ears and quick feet")),
    ("mouse", "", True, 2, ("a tiny pink nose", "round ears and a long tail")),
    ("bird", "", True, 2, ("bright blue feathers", "a sweet voice")),
    ("duck", "", True, 2, ("yellow feet", "shiny white feathers")),
    ("frog", "", True, 2, ("long green legs", "a very big mouth")),
    ("owl", "", True, 1, ("big round eyes", "soft gray feathers")),
    ("pig", "", True, 1, ("a curly tail", "a round pink nose")),
    ("horse", "", True, 1, ("a long shiny mane", "strong legs")),
    ("lion", "", True, 1, ("a big golden mane", "a very loud roar")),
    ("turtle", "", True, 1, ("a hard green shell", "slow little feet")),
    ("squirrel", "", True, 1, ("a big fluffy tail", "quick little paws")),
    ("puppy", "", True, 2, ("a wet black nose", "big brown eyes")),
    ("kitten", "", True, 2, ("tiny white paws", "soft gray fur")),
    ("girl", "f", False, 6, ("curly red hair", "a big smile", "a yellow raincoat")),
    ("boy", "m", False, 6, ("a blue cap", "a big smile", "muddy boots")),
    ("old man", "m", False, 1, ("a long white beard", "a wooden stick")),
    ("old woman", "f", False, 1, ("a warm red shawl", "kind gray eyes")),
    ("princess", "f", False, 1, ("a little gold crown", "a long green dress")),
    ("prince", "m", False, 1, ("a shiny sword", "a long blue cape")),
)
_ANIMAL_ADJ = ("little", "small", "big", "brave", "shy", "kind", "curious", "funny", "clever",
               "fluffy", "tiny", "sleepy", "hungry", "friendly", "young", "happy", "lazy")
_PERSON_ADJ = ("little", "young", "kind", "brave", "shy", "clever", "curious", "friendly", "funny",
               "quiet", "cheerful", "happy", "busy")

# (the place, where one is at it, is it a good place to get lost in)
_PLACES = (
    ("the park", "in the park"), ("the river", "by the river"), ("the beach", "on the beach"),
    ("the forest", "in the forest"), ("the garden", "in the garden"), ("the farm", "on the farm"),
    ("the hill", "on the hill"), ("the lake", "by the lake"), ("the meadow", "in the meadow"),
    ("the town square", "in the town square"), ("the playground", "at the playground"),
    ("the pond", "by the pond"), ("the woods", "in the woods"), ("the zoo", "at the zoo"),
    ("the sea", "by the sea"), ("the field", "in the field"), ("the market", "at the market"),
    ("the big tree", "under the big tree"), ("the mountain", "on the mountain"),
    ("the old bridge", "near the old bridge"),
)
_HOMES = ("near the river", "in a small house", "on a farm", "in a big city", "in a little town",
          "at the edge of the forest", "under an old oak tree", "in a house by the sea",
          "in a cozy little hole", "on top of a hill", "in a yellow house by the road")
_HOBBIES = ("play in the garden", "run fast", "read books", "sing songs", "dig holes",
            "climb trees",
            "eat apples", "swim in the lake", "look at the stars", "draw pictures",
            "build things", "chase butterflies", "bake cakes", "jump in puddles", "fly kites",
            "tell jokes", "dance in the rain", "collect shiny stones", "play games with friends")
_COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white")
_OBJECT_ADJ = _COLORS + ("big", "little", "new", "old", "shiny", "favorite")
_OBJECTS = ("ball", "kite", "hat", "box", "boat", "bike", "cup", "scarf", "balloon", "bucket",
            "key", "book", "bell", "drum", "ring", "lamp", "blanket", "umbrella", "teddy bear",
            "toy car", "shoe", "crayon", "wagon", "whistle")
_FOODS = ("apples", "sandwiches", "cookies", "cheese", "bread and jam", "carrots", "berries",
          "honey cakes", "a big pie", "oranges", "nuts")
_CRITTERS = ("bird", "kitten", "puppy", "duckling", "bunny", "frog", "owl")
_TROUBLES = ("was stuck in a tree", "had hurt its leg", "could not find its mother",
             "had fallen into the water", "was very cold and hungry", "was crying by the road",
             "was caught in a fence")
_BEASTS = ("wolf", "fox", "snake", "bear", "big dog", "wild cat")
_DARK_PLACES = (("cave", "a dark cave"), ("old house", "an old empty house"),
                ("castle", "a big old castle"), ("tunnel", "a long dark tunnel"),
                ("barn", "an old barn"))
_GAMES = ("tag", "hide and seek", "catch", "with a ball", "in the sand", "by the water",
          "with sticks and stones", "a guessing game")
_WISHES = ("a new bike", "a puppy of {his} own", "to see the sea", "to fly like a bird",
           "a big red balloon", "to find a friend", "to climb the tall mountain",
           "to ride a horse", "a cake with ten candles", "to sing in the big show")
_WEATHERS = ("sunny", "rainy", "windy", "snowy", "cloudy", "foggy", "cold", "hot")
_WEATHER_LINES = {
    "sunny": ("The sun was [shining|bright|warm], and the [birds were singing|sky was blue"
              "|flowers were open].", "It was a [warm and |]sunny day, and everyone was outside."),
    "rainy": ("It was raining, and the [ground was wet|streets were full of puddles].",
              "Rain was falling [softly|hard] on the roof."),
    "windy": ("The wind was [blowing hard|strong], and the leaves were [dancing|flying] in the "
              "air.",),
    "snowy": ("Snow was falling, and everything was white and quiet.",
              "It had snowed all night, and the ground was soft and white."),
    "cloudy": ("The sky was gray and full of clouds.",),
    "foggy": ("The fog was so thick that {name} could not see very far.",),
    "cold": ("It was cold, so {name} wore {his} [warm coat|red scarf|wool hat].",),
    "hot": ("It was very hot, and {name} wanted something cold to drink.",
            "The day was hot, so {name} [sat in the shade|drank lots of water]."),
}
_MOODS = {
    "happy": ("it was {his} birthday", "school was over", "the sun was out",
              "{his} grandma was coming to visit", "{he} had a new [toy|book|hat]"),
    "sad": ("{his} best friend had moved away", "{he} had nobody to play with",
            "it was raining again", "{his} favorite toy was broken"),
    "bored": ("there was nothing to do", "everyone else was busy"),
    "excited": ("it was the first day of summer", "{his} dad had a surprise for {him}"),
}

# --------------------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class _Plot:
    """What happens in a story: steps (probability, alternatives) and endings per sentiment.

    An ending is (first sentence alternatives, optional second sentence alternatives).
    `outdoor` plots may be preceded by a weather sentence.
    """

    steps: tuple[tuple[float, tuple[str, ...]], ...]
    endings: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    outdoor: bool = True


_LOST = _Plot(
    steps=(
        (1.0, ("[One day|One afternoon|That day], {name} was playing with {his} {obj} {at_place}.",
               "{name} took {his} {obj} to {place} to [play|show {his} friends].",
               "{name} had {a_obj} that {he} loved very much.")),
        (1.0, ("But when {he} [looked down|turned around|came back], the {obj} was gone!",
               "Suddenly, {his} {obj} [rolled away|fell into the tall grass|was gone].",
               "After a while, {he} could not find {his} {obj} anywhere.")),
        (0.6, ('"Where is my {obj}?" [cried|asked|said] {name}.',
               "{name} looked [under the trees|behind the rocks|in the tall grass|everywhere], "
               "but it was not there.",
               "{He} [looked|searched] for it [all day|for a long time|until the sun went down].")),
        (0.4, ("{his_friend} saw that {name} was sad and [came to help|asked what was wrong].",
               '"I will help you look," said {his_friend}.')),
    ),
    endings={
        "happy": (("[At last|Finally|Then], {name} found the {obj} [under a big leaf|behind a tree"
                   "|next to a rock|in a bush].",
                   "{his_friend} found the {obj} and gave it back to {name}."),
                  ("{name} was so happy that {he} [smiled|laughed|jumped up and down].",
                   '"Thank you so much!" said {name} with a big smile.')),
        "sad": (("But the {obj} was [never found|gone forever|lost for good].",
                 "{name} looked and looked, but {he} never found {his} {obj}.",
                 "When {he} finally found it, the {obj} was broken."),
                ("{name} [felt very sad|cried all the way home|was sad and lonely] that night.",
                 "{He} sat down and cried, because {he} missed {his} {obj}.")),
        "scary": (("[Then|Suddenly], {name} heard a [loud|strange|terrible] [noise|growl|sound] "
                   "[behind {him}|in the dark|from the bushes].",
                   "As {he} looked behind a big rock, {he} saw two [red|yellow] eyes in the dark."),
                  ("{name} was so scared that {he} [ran all the way home|screamed and ran away].",
                   "{He} was afraid, and {he} never went back to {place} again.")),
    },
)

_FOUND = _Plot(
    steps=(
        (1.0, ("While {he} was [walking|playing|running] {at_place}, {name} found {a_obj}.",
               "{name} found {a_obj} [under a tree|in the sand|next to the path"
               "|behind an old door].",
               "One day, {name} was walking {at_place} when {he} saw something shiny.")),
        (1.0, ("It was [the most beautiful|the strangest|a very old] {obj_noun} {he} had ever "
               "seen.",
               '"What is this?" {name} asked.',
               "{He} picked it up and [looked at it closely|put it in {his} pocket"
               "|took it home].")),
        (0.5, ("{He} wanted to show it to {his_friend}.",
               "{name} wondered who it belonged to.")),
    ),
    endings={
        "happy": (("{He} gave it to {his_friend}, and {fhe} loved it.",
                   "It was a magic {obj_noun}, and it [made flowers grow|sang a sweet song"
                   "|made everyone smile].",
                   "{name} found the owner, a kind old [man|woman], who was very happy to have it "
                   "back."),
                  ("{name} felt [warm and happy|proud|very happy] inside.",
                   "It was the best day {name} ever had.")),
        "sad": (("But on the way home, {he} dropped it and it broke.",
                 "But the next day it was gone, and {name} never saw it again.",
                 "But a big bird took it away, and {name} could not get it back."),
                ("{name} was sad, and a tear rolled down {his} face.",
                 "{He} felt sad and lonely for a long time.")),
        "scary": (("That night, the {obj_noun} began to glow and make strange noises.",
                   "Then a cold wind blew, and a dark shadow came out of the trees."),
                  ("{name} was terrified and threw it away.",
                   "{name} screamed and ran home as fast as {he} could.")),
    },
)

_MEET = _Plot(
    steps=(
        (1.0, ("One day, {name} met {a_fkind} named {fname} {at_place}.",
               "While {he} was playing {at_place}, {name} saw {a_fkind} named {fname} sitting all "
               "alone.",
               "{At_place}, there was {a_fkind} called {fname} who had no friends.")),
        (1.0, ('"Hello, my name is {name}," said the {kind}.',
               '"Do you want to play with me?" asked {name}.',
               '"Will you be my friend?" asked {name}.')),
        (0.8, ("{fname} smiled and said yes.",
               "{fname} was shy at first, but soon {fhe} smiled.")),
        (0.6, ("They played {game} [all day|until the sun went down|for hours].",
               "Together they [built a little house out of sticks|picked flowers"
               "|counted the clouds|sang songs].")),
    ),
    endings={
        "happy": (("From that day on, {name} and {fname} were best friends.",
                   "They laughed and had the best day ever."),
                  ("{name} was never lonely again.",
                   "Every day after that, they played together and had fun.")),
        "sad": (("But the next day, {fname} had to move to a town far away.",
                 "But then {fname} had to go home, and {name} never saw {fhim} again."),
                ("{name} missed {his} friend and felt very lonely.",
                 "{name} sat alone and cried.")),
        "scary": (("Suddenly, a big {beast} came out of the [trees|bushes] and growled at them.",
                   "Then the sky turned black, and thunder shook the ground."),
                  ("The two friends were so scared that they ran home as fast as they could.",
                   "They hid behind a rock and shook with fear.")),
    },
)

_TRIP = _Plot(
    steps=(
        (1.0, ('"Let\'s go to {place}," said {name} to {his_friend}.',
               '"Can we go to {place} today?" {name} asked {his_friend}.',
               "{name} and {his_friend} wanted to go to {place}.")),
        (1.0, ("So they packed {food} and set off.",
               "On the way, they [sang songs|talked and laughed|saw a big red barn"
               "|crossed a little bridge].",
               "When they got to {place}, [the sun was shining|it was very quiet"
               "|there were many people].")),
        (0.5, ('"This is so much fun!" said {fname}.',
               '"Look at that!" said {fname}, pointing at the sky.')),
    ),
    endings={
        "happy": (("They had a picnic and ate {food} [under a big tree|by the water"
                   "|in the warm sun].",
                   "They saw a [beautiful rainbow|family of ducks|big white ship|field of flowers] "
                   "and [smiled|laughed|clapped]."),
                  ("It was the best day of {his} life.",
                   "{name} and {fname} went home happy and tired.")),
        "sad": (("But it started to rain, and they had to go home.",
                 "But {fname} fell and hurt {fhis} leg, and {fhe} started to cry."),
                ("It was a sad day, and nobody smiled on the way home.",
                 "{name} was sad because the day was ruined.")),
        "scary": (("But when it got dark, they could not find the way home.",
                   "Then they heard something big moving [in the trees|behind them]."),
                  ("They were lost and afraid, and the night was very cold.",
                   "They were so scared that they ran and ran without looking back.")),
    },
)

_STORM = _Plot(
    steps=(
        (1.0, ("{name} was [flying {his} kite|playing with {his} {obj}|reading a book"
               "|having a picnic] {at_place}.",)),
        (1.0, ("Suddenly, the sky turned [dark|gray|black] and the wind began to blow.",
               "Then big clouds came, and it started to rain.",
               "Then a storm came over the hill, with thunder and lightning.")),
        (0.5, ('"Oh no, a storm is coming!" cried {name}.',
               "{name} [ran|looked] for a place to hide from the rain.")),
    ),
    endings={
        "happy": (("{name} ran home [just in time|and sat by the warm fire].",
                   "When the rain stopped, there was a big rainbow in the sky."),
                  ("{name} smiled, because the storm was over and everything was fresh and clean.",
                   "{He} drank warm milk and felt safe and happy.")),
        "sad": (("The wind took {his} {obj} high into the sky, and it was gone.",
                 "The rain ruined {his} {obj}, and {he} had to go home wet and cold."),
                ("{name} cried, because it was {his} favorite {obj_noun}.",
                 "{He} was sad for the rest of the day.")),
        "scary": (("A big tree fell down right next to {him} with a loud crash.",
                   "Lightning hit a tree, and the thunder was so loud that the ground shook."),
                  ("{name} was shaking with fear and ran home crying.",
                   "{name} was so frightened that {he} hid under {his} bed all night.")),
    },
)

_HELP = _Plot(
    steps=(
        (1.0, ("One day, {name} saw a little {critter} that {trouble}.",
               "While {he} was walking {at_place}, {name} found a little {critter} that "
               "{trouble}.")),
        (1.0, ('"Don\'t worry, I will help you," said {name}.',
               "{name} wanted to help, but {he} did not know what to do.",
               "{name} [ran over|bent down|walked over slowly] to help the little {critter}.")),
        (0.5, ("{He} asked {his_friend} for help.",
               "It was [hard|not easy], but {name} did not give up.")),
    ),
    endings={
        "happy": (("{name} took the little {critter} home and [took care of it"
                   "|gave it some warm milk], and soon it was well again.",
                   "Soon the little {critter} was safe and happy again."),
                  ('"You are a hero!" said {his} mom.',
                   "{name} felt proud and happy, because {he} had helped a friend.")),
        "sad": (("But {name} was too late, and the little {critter} was gone.",
                 "{name} tried and tried, but {he} could not help the little {critter}."),
                ("{He} walked home slowly, feeling very sad.",
                 "That night, {name} cried for the little {critter}.")),
        "scary": (("Just then, a big {beast} jumped out of the bushes!",
                   "Then a huge shadow fell over them, and something growled."),
                  ("{name} grabbed the little {critter} and ran away, screaming.",
                   "{name} was so scared that {he} could not move.")),
    },
)

_PARTY = _Plot(
    steps=(
        (1.0, ("It was {name}'s birthday, and {he} wanted to have a party.",
               "{name} wanted to bake a cake for {his_friend}.",
               "{name} and {his} mom were getting ready for a big party.")),
        (1.0, ("{He} [baked a chocolate cake|made a big cake with {color} frosting"
               "|put {color} balloons everywhere|made little hats for everyone].",
               "{He} invited all {his} friends to come to {his} house.")),
        (0.4, ('"I hope everyone will come," said {name}.',
               "{name} waited by the door and looked out the window.")),
    ),
    endings={
        "happy": (("All {his} friends came, and they [sang songs|danced|played games] and ate "
                   "cake.",
                   "Everyone loved the cake and said it was the best party ever."),
                  ("{name} was so happy that {he} could not stop smiling.",
                   "It was a wonderful day, full of love and laughter.")),
        "sad": (("But nobody came to the party, and {name} sat alone with {his} cake.",
                 "But the cake fell on the floor and broke into pieces."),
                ("{name} felt sad and began to cry.",
                 "It was the worst birthday ever.")),
        "scary": (("Suddenly, the lights went out and the house was dark.",
                   "Then there was a loud knock on the door, but nobody was there."),
                  ("Everyone screamed, and {name} hid under the table.",
                   "{name} was scared and held {his} mom's hand tight.")),
    },
    outdoor=False,
)

_NIGHT = _Plot(
    steps=(
        (1.0, ("One night, {name} could not sleep.",
               "It was late at night, and {name} was in bed.")),
        (1.0, ("{He} heard a [strange|soft|loud] noise [outside the window|under the bed"
               "|in the kitchen|on the roof].",
               "There was a [tap, tap, tap|scratch, scratch|long creak] at the door.")),
        (0.6, ('"Who is there?" {name} [whispered|asked].',
               "{name} pulled the blanket over {his} head.")),
    ),
    endings={
        "happy": (("It was just the wind, and {name} smiled and went back to sleep.",
                   "It was only a little cat looking for a warm place to sleep.",
                   "It was {his} mom, who came to give {him} a good night kiss."),
                  ("{He} slept well and had happy dreams.",
                   "{name} felt safe and warm.")),
        "sad": (("It was only the rain, and {name} remembered that {his} friend had gone away.",
                 "It was only the wind, but {name} still felt alone in the dark."),
                ("{He} felt lonely and cried until {he} fell asleep.",
                 "{name} was sad all night.")),
        "scary": (("A big dark shadow moved across the wall.",
                   "The door opened slowly, and two yellow eyes looked in."),
                  ("{name} was so afraid that {he} screamed for {his} mom.",
                   "{He} did not sleep at all that night.")),
    },
    outdoor=False,
)

_WISH = _Plot(
    steps=(
        (1.0, ("{name} [really wanted|wished for|dreamed of having] {wish}.",)),
        (1.0, ("Every day, {he} [asked {his} mom about it|looked out the window and wished"
               "|thought about it].",
               "{He} [worked hard|waited and waited|told everyone about it].")),
        (0.4, ('"One day it will happen," said {name}.',
               "{his_friend} said that wishes sometimes come true.")),
    ),
    endings={
        "happy": (("One [morning|day], {his} wish came true.",
                   "At last, the big day came, and {his} wish came true."),
                  ("{He} was the happiest {kind} in the world.",
                   "{name} laughed and shouted with joy.")),
        "sad": (("But {his} wish never came true.",
                 "But the years went by, and {his} wish did not come true."),
                ("{name} was sad, but {he} still wished every night.",
                 "{He} felt sad and a little lonely.")),
    },
    outdoor=False,
)

_RACE = _Plot(
    steps=(
        (1.0, ("{name} and {his_friend} decided to have a race [to the big tree|to the river"
               "|across the field].",
               "There was a big race {at_place}, and {name} and {his_friend} wanted to win.")),
        (1.0, ('"Ready, set, go!" [shouted|said] {fname}.',
               "They ran as fast as they could.")),
        (0.5, ("{name} was in front, but {fname} was right behind {him}.",
               "At first {fname} was faster, but {name} did not give up.")),
    ),
    endings={
        "happy": (("{name} won the race, and everyone cheered.",
                   "They reached the end at the same time, and they laughed and laughed."),
                  ("It was a wonderful day.",
                   "{name} was very proud and happy.")),
        "sad": (("But {name} tripped over a rock and hurt {his} knee.",
                 "{name} lost the race and felt sad."),
                ("{He} cried, and {fname} walked {him} home.",
                 "{name} did not want to race ever again.")),
        "scary": (("Halfway there, the ground shook, and a huge {beast} stood in front of them.",),
                  ("They screamed and ran back the way they came.",)),
    },
)

_EXPLORE = _Plot(
    steps=(
        (1.0, ("{name} found {a_dark} [at the bottom of the hill|in the forest"
               "|at the end of the road].",
               "There was {a_dark} near {his} home, and nobody ever went inside.")),
        (1.0, ("{name} was curious and wanted to look inside.",
               '"I am not afraid," said {name}, and {he} went inside.')),
        (0.6, ("It was dark and cold, and {he} could hear water dripping.",
               "{He} walked [slowly|carefully], holding a little lamp.")),
    ),
    endings={
        "happy": (("Inside, {he} found a box full of [gold coins|old toys|beautiful stones], and "
                   "{he} shouted with joy.",
                   "Inside, there was a family of little [rabbits|kittens|birds] who were happy to "
                   "see {him}."),
                  ("{name} smiled all the way home.",
                   "It was the best adventure ever.")),
        "sad": (("But there was nothing inside, only dust and old broken things.",
                 "But {he} slipped and hurt {his} foot on a sharp stone."),
                ("{name} went home feeling sad and disappointed.",
                 "{He} limped home, crying softly.")),
        "scary": (("Suddenly, something big and hairy moved in the dark.",
                   "A door slammed shut behind {him}, and the lamp went out."),
                  ("{name} screamed and ran out as fast as {he} could.",
                   "{He} never went near the {dark} again.")),
    },
)

_PLOTS = (_LOST, _FOUND, _MEET, _TRIP, _STORM, _HELP, _PARTY, _NIGHT, _WISH, _RACE, _EXPLORE)
_SENTIMENT_WEIGHTS = {"happy": 0.5, "sad": 0.28, "scary": 0.22}

_OPENINGS = (
    "Once upon a time, there was {a_adj_kind} named {name}.",
    "There once was {a_adj_kind} called {name} who lived {home}.",
    "{name} was {a_adj_kind} who [loved|liked] to {hobby}.",
    "Once there was {a_adj_kind} named {name} who lived {home}.",
    "{name} the {kind} lived {home}[ with {his} mom| with {his} grandma| with {his} family|].",
    "In a little town by the sea, there lived {a_adj_kind} named {name}.",
    "Every day, {name} the {kind} went to {place} to {hobby}.",
    "{name} was {a_adj_kind} who lived {home}.",
    "Long ago, {a_adj_kind} named {name} lived {home}.",
)
_DETAILS = (
    "{He} had {feature} and loved to {hobby}.",
    "{name} had {feature}.",
    "{name} felt {mood} [that day|that morning] because {reason}.",
    "{name} was {mood}, because {reason}.",
    "Because {reason}, {name} felt {mood}.",
    "When {he} woke up, {name} felt {mood}, because {reason}.",
)
_CLOSINGS = {
    "happy": ("From that day on, {name} [always smiled|was never sad again].",
              "And they all lived happily ever after.",
              "It was a day {name} would never forget.",
              "{name} learned that [friends help each other|it is good to share"
              "|being kind makes everyone happy]."),
    "sad": ("Sometimes days are sad, and that is okay.",
            "{name} still thinks about it [sometimes|every day].",
            "It was a day {name} would never forget."),
    "scary": ("To this day, nobody knows what was out there.",
              "And {name} never went out at night again.",
              "It was a day {name} would never forget."),
}

# --------------------------------------------------------------------------------------- engine

_ALTERNATION = re.compile(r"\[([^\[\]]*)\]")


def _article(phrase: str) -> str:
    """'an old man', 'a dog': the article by the first letter (enough for this lexicon)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _capitalise(sentence: str) -> str:
    """Upper-case the first letter (after an opening quote, if any)."""
    i = 1 if sentence.startswith('"') else 0
    return sentence[:i] + sentence[i].upper() + sentence[i + 1:]


def _realise(template: str, rng: random.Random, ctx: dict[str, str]) -> str:
    """Expand ``[a|b]`` alternatives (innermost first), then fill ``{slots}`` from ``ctx``."""
    count = 1
    while count:
        template, count = _ALTERNATION.subn(lambda m: rng.choice(m.group(1).split("|")), template)
    # Slots may themselves hold alternatives or slots (e.g. the wish "a puppy of {his} own").
    text = template.format_map(ctx)
    if "{" in text or "[" in text:
        text = _realise(text, rng, ctx)
    return _capitalise(text)


def _character(rng: random.Random, avoid: str = "") -> dict[str, str]:
    """A named character: name, kind, an adjective, pronouns and a feature it has."""
    weights = [k[3] for k in _KINDS]
    noun, gender, animal, _, features = rng.choices(_KINDS, weights=weights)[0]
    gender = gender or rng.choice("fm")
    names = _FEMALE_NAMES if gender == "f" else _MALE_NAMES
    name = rng.choice([n for n in names if n != avoid])
    adj = rng.choice(_ANIMAL_ADJ if animal else _PERSON_ADJ)
    he, his, him = ("she", "her", "her") if gender == "f" else ("he", "his", "him")
    return {"name": name, "kind": noun, "adj": adj, "he": he, "his": his, "him": him,
            "feature": rng.choice(features), "a_adj_kind": _article(f"{adj} {noun}")}


def _context(rng: random.Random) -> dict[str, str]:
    """Every slot a template may use, drawn once per story so the story stays consistent."""
    hero = _character(rng)
    friend = _character(rng, avoid=hero["name"])
    place, at_place = rng.choice(_PLACES)
    obj = f"{rng.choice(_OBJECT_ADJ)} {rng.choice(_OBJECTS)}"
    dark, a_dark = rng.choice(_DARK_PLACES)
    mood = rng.choice(tuple(_MOODS))
    ctx = dict(hero)
    ctx.update(He=hero["he"].capitalize(), fname=friend["name"], fkind=friend["kind"],
               fhe=friend["he"], fhis=friend["his"], fhim=friend["him"],
               a_fkind=friend["a_adj_kind"],
               his_friend=f"{hero['his']} friend {friend['name']}",
               place=place, at_place=at_place, At_place=at_place.capitalize(),
               obj=obj, obj_noun=obj.split(" ", 1)[1], a_obj=_article(obj),
               food=rng.choice(_FOODS), color=rng.choice(_COLORS), home=rng.choice(_HOMES),
               hobby=rng.choice(_HOBBIES), game=rng.choice(_GAMES), critter=rng.choice(_CRITTERS),
               trouble=rng.choice(_TROUBLES), beast=rng.choice(_BEASTS), dark=dark, a_dark=a_dark,
               wish=rng.choice(_WISHES), mood=mood, reason=rng.choice(_MOODS[mood]))
    return ctx


def _story(rng: random.Random) -> str:
    """One story: opening, optional details/weather, plot steps, an ending, maybe a closing."""
    ctx = _context(rng)
    plot = rng.choice(_PLOTS)
    sentiments = [s for s in _SENTIMENT_WEIGHTS if s in plot.endings]
    sentiment = rng.choices(sentiments, weights=[_SENTIMENT_WEIGHTS[s] for s in sentiments])[0]

    middle = [rng.choice(alts) for p, alts in plot.steps if p >= 1.0 or rng.random() < p]
    first, second = plot.endings[sentiment]
    ending = [rng.choice(first)] + ([rng.choice(second)] if rng.random() < 0.75 else [])
    closing = [rng.choice(_CLOSINGS[sentiment])] if rng.random() < 0.3 else []

    extras = []
    if rng.random() < 0.45:
        extras.append(rng.choice(_DETAILS))
    if plot.outdoor and rng.random() < 0.35:
        extras.append(rng.choice(_WEATHER_LINES[rng.choice(_WEATHERS)]))
    room = 7 - 1 - len(middle) - len(ending) - len(closing)
    extras = extras[:max(room, 0)]

    templates = [rng.choice(_OPENINGS), *extras, *middle, *ending, *closing][:7]
    return " ".join(_realise(t, rng, ctx) for t in templates)


def generate_stories(n: int, seed: int) -> list[str]:
    """Return `n` stories of 3–7 sentences, the same list for the same `seed`.

    Uses its own ``random.Random(seed)``; no global random state is read or changed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}; ask for zero or more stories")
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]
