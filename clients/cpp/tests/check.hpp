// A minimal test harness: TEST(name) { CHECK(...); CHECK_EQ(a, b); }, run by ctest.
// Each failed check prints its file, line and values; main() prints "N passed, M failed".
#pragma once

#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace lars_test {

struct Case {
    const char* name;
    void (*body)();
};

inline std::vector<Case>& cases() {
    static std::vector<Case> all;
    return all;
}

inline int& failures() {
    static int count = 0;
    return count;
}

struct Registrar {
    Registrar(const char* name, void (*body)()) { cases().push_back({name, body}); }
};

inline void fail(const char* file, int line, const std::string& what) {
    ++failures();
    std::cerr << file << ":" << line << ": FAILED: " << what << std::endl;
}

template <class A, class B>
void check_eq(const A& a, const B& b, const char* text_a, const char* text_b, const char* file,
              int line) {
    if (!(a == b)) {
        std::ostringstream out;
        out << text_a << " == " << text_b << " (" << a << " != " << b << ")";
        fail(file, line, out.str());
    }
}

inline int run_all(int argc, char** argv) {
    int passed = 0, failed = 0;
    for (const auto& c : cases()) {
        if (argc > 1 && std::string(argv[1]).rfind("--", 0) != 0 &&
            std::string(c.name).find(argv[1]) == std::string::npos) {
            continue;
        }
        const int before = failures();
        try {
            c.body();
        } catch (const std::exception& exc) {
            fail(__FILE__, __LINE__, std::string("uncaught exception: ") + exc.what());
        }
        const bool ok = failures() == before;
        std::cout << (ok ? "ok     " : "FAILED ") << c.name << std::endl;
        (ok ? passed : failed) += 1;
    }
    std::cout << passed << " passed, " << failed << " failed" << std::endl;
    return failed == 0 ? 0 : 1;
}

}  // namespace lars_test

#define TEST(name)                                                  \
    static void name();                                             \
    static const lars_test::Registrar name##_registrar(#name, name); \
    static void name()

#define CHECK(cond)                                            \
    do {                                                       \
        if (!(cond)) lars_test::fail(__FILE__, __LINE__, #cond); \
    } while (0)

#define CHECK_EQ(a, b) lars_test::check_eq((a), (b), #a, #b, __FILE__, __LINE__)

#define CHECK_THROWS(type, expr)                                                  \
    do {                                                                          \
        bool thrown_ = false;                                                     \
        try {                                                                     \
            (void)(expr);                                                         \
        } catch (const type&) {                                                   \
            thrown_ = true;                                                       \
        } catch (const std::exception& exc_) {                                    \
            lars_test::fail(__FILE__, __LINE__,                                   \
                            std::string(#expr " threw another error: ") + exc_.what()); \
            thrown_ = true;                                                       \
        }                                                                         \
        if (!thrown_) lars_test::fail(__FILE__, __LINE__, #expr " did not throw " #type); \
    } while (0)
