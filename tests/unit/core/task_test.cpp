// Task<T>: laziness, values and exceptions across co_await, symmetric transfer without stack
// growth, and Scope.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/core/task.hpp"

using namespace layerd::core;
using namespace std::chrono_literals;

namespace {

Task<int> answer() { co_return 42; }

Task<std::string> concat(std::string a) {
  int n = co_await answer();
  co_return a + std::to_string(n);
}

Task<int> thrower() {
  throw std::runtime_error("boom");
  co_return 0;
}

Task<void> void_thrower() {
  co_await yield();
  throw std::logic_error("void boom");
}

TEST(Task, IsLazyUntilAwaited) {
  Loop loop;
  bool started = false;
  auto body = [](bool& flag) -> Task<int> {
    flag = true;
    co_return 1;
  };
  Task<int> task = body(started);
  EXPECT_FALSE(started);
  EXPECT_EQ(loop.block_on(std::move(task)), 1);
  EXPECT_TRUE(started);
}

TEST(Task, ValuesCrossCoAwait) {
  Loop loop;
  EXPECT_EQ(loop.block_on(concat("x")), "x42");
}

TEST(Task, ExceptionsCrossCoAwait) {
  Loop loop;
  auto outer = []() -> Task<std::string> {
    try {
      (void)co_await thrower();
    } catch (const std::runtime_error& e) {
      co_return std::string("caught ") + e.what();
    }
    co_return "not caught";
  };
  EXPECT_EQ(loop.block_on(outer()), "caught boom");
  EXPECT_THROW(loop.block_on(void_thrower()), std::logic_error);
}

Task<int> ready_leaf(int i) { co_return i; }

TEST(Task, MillionSynchronousAwaitsDoNotGrowTheStack) {
  Loop loop;
  auto body = []() -> Task<long> {
    long sum = 0;
    for (int i = 0; i < 1'000'000; ++i) sum += co_await ready_leaf(i & 1);
    co_return sum;
  };
  EXPECT_EQ(loop.block_on(body()), 500'000);
}

// A deep chain of nested tasks that finish synchronously: symmetric transfer keeps resumption
// off the stack in both directions.
Task<int> nested(int depth) {
  if (depth == 0) co_return 0;
  co_return 1 + co_await nested(depth - 1);
}

TEST(Task, DeepNestingFinishes) {
  Loop loop;
  EXPECT_EQ(loop.block_on(nested(100'000)), 100'000);
}

TEST(Scope, JoinWaitsForAllSpawnedTasks) {
  Loop loop;
  Scope scope;
  int finished = 0;
  auto worker = [](int* counter, int ms) -> Task<void> {
    co_await sleep(std::chrono::milliseconds(ms));
    ++*counter;
  };
  auto main_task = [&]() -> Task<bool> {
    for (int i = 0; i < 50; ++i) scope.spawn(worker(&finished, i % 5));
    EXPECT_EQ(scope.active(), 50u);
    co_return co_await scope.join();
  };
  EXPECT_TRUE(loop.block_on(main_task()));
  EXPECT_EQ(finished, 50);
  EXPECT_EQ(scope.active(), 0u);
}

TEST(Scope, ErrorsGoToTheHandler) {
  Loop loop;
  int errors = 0;
  Scope scope([&](std::exception_ptr) { ++errors; });
  auto main_task = [&]() -> Task<bool> {
    scope.spawn(void_thrower());
    scope.spawn(void_thrower());
    co_return co_await scope.join();
  };
  EXPECT_TRUE(loop.block_on(main_task()));
  EXPECT_EQ(errors, 2);
  EXPECT_EQ(scope.failed(), 2u);
}

TEST(Scope, JoinForGivesUpAtTheDeadline) {
  Loop loop;
  Scope scope;
  CancelSource stop;
  auto slow = [](CancelSource* s) -> Task<void> { (void)co_await sleep(10s).cancel_on(s); };
  auto main_task = [&]() -> Task<bool> {
    scope.spawn(slow(&stop));
    bool joined = co_await scope.join_for(20ms);
    stop.cancel();
    EXPECT_TRUE(co_await scope.join());
    co_return joined;
  };
  auto start = Clock::now();
  EXPECT_FALSE(loop.block_on(main_task()));
  EXPECT_LT(Clock::now() - start, 5s);
}

}  // namespace
