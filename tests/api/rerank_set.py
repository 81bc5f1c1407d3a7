"""A small labelled rerank set: per query, its one relevant passage first, then three
distractors (some on a related topic, so that word overlap alone does not decide)."""

SET = [
    (
        "What is the capital of France?",
        "Paris is the capital and largest city of France.",
        [
            "The Great Barrier Reef lies off the coast of Australia.",
            "Photosynthesis turns light into chemical energy in plants.",
            "Berlin is the capital of Germany.",
        ],
    ),
    (
        "How do plants make food?",
        "Plants make their food by photosynthesis, using sunlight, water and carbon dioxide.",
        [
            "The stock market fell sharply on Monday.",
            "Cats sleep for most of the day.",
            "Paris is the capital and largest city of France.",
        ],
    ),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet is a tragedy written by William Shakespeare.",
        [
            "Mount Everest is the highest mountain on Earth.",
            "Python is a popular programming language.",
            "The novel Pride and Prejudice was written by Jane Austen.",
        ],
    ),
    (
        "What is the boiling point of water?",
        "Water boils at 100 degrees Celsius at sea level.",
        [
            "The Amazon is the largest rainforest in the world.",
            "Football is played with eleven players on each side.",
            "Ice melts at zero degrees Celsius.",
        ],
    ),
    (
        "How many legs does a spider have?",
        "A spider has eight legs.",
        [
            "Insects such as ants have six legs.",
            "The moon orbits the Earth every 27 days.",
            "Bread is baked in an oven.",
        ],
    ),
    (
        "What language is spoken in Brazil?",
        "Portuguese is the official language of Brazil.",
        [
            "Spanish is spoken in most of South America.",
            "The Sahara is a large desert in Africa.",
            "Guitars usually have six strings.",
        ],
    ),
    (
        "Which planet is known as the red planet?",
        "Mars is called the red planet because of iron oxide on its surface.",
        [
            "Jupiter is the largest planet in the solar system.",
            "Roses are often red.",
            "The Pacific is the largest ocean.",
        ],
    ),
    (
        "How do I sort a list in Python?",
        "In Python, call sorted(my_list) or my_list.sort() to sort a list.",
        [
            "Snakes are reptiles without legs.",
            "To bake a cake, mix flour, eggs and sugar.",
            "Java is a programming language from Sun Microsystems.",
        ],
    ),
    (
        "When did World War II end?",
        "World War II ended in 1945 with the surrender of Germany and Japan.",
        [
            "World War I began in 1914.",
            "The printing press was invented by Gutenberg.",
            "Bananas are rich in potassium.",
        ],
    ),
    (
        "What do bees produce?",
        "Bees collect nectar from flowers and produce honey.",
        ["Cows produce milk.", "The Eiffel Tower is in Paris.", "Computers store data in memory."],
    ),
    (
        "What is the largest mammal?",
        "The blue whale is the largest mammal that has ever lived.",
        [
            "Elephants are the largest land animals.",
            "Tennis is played with a racket and a ball.",
            "Gold is a precious metal.",
        ],
    ),
    (
        "How does a vaccine work?",
        "A vaccine trains the immune system to recognise and fight a specific pathogen.",
        [
            "Antibiotics kill bacteria but not viruses.",
            "Trains run on railway tracks.",
            "The violin is a string instrument.",
        ],
    ),
]
